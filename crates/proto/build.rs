//! Compiles `proto/nds.proto` with protox (no `protoc` needed) into Rust
//! types, and Kubernetes' core/v1 messages into a descriptor set that the
//! server reads Kubernetes' protobuf request bodies with.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/nds.proto";
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .compile_fds(fds)?;

    let kubernetes = protox::compile(["k8s.io/api/core/v1/generated.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("kubernetes.bin");
    std::fs::write(out, kubernetes.encode_to_vec())?;
    Ok(())
}
