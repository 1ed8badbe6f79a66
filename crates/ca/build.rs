//! Compiles `proto/istio_ca.proto` with protox (no `protoc` needed) and
//! generates the tonic client and server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/istio_ca.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Share google.protobuf.Struct with the Envoy types the rest of the
        // workspace uses, so values pass between crates without conversion.
        .extern_path(
            ".google.protobuf.Struct",
            "::envoy_types::pb::google::protobuf::Struct",
        )
        .compile_fds(fds)?;
    Ok(())
}
