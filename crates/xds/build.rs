//! Finds the protobuf descriptors envoy-types ships beside its generated
//! code (`src/generated/types.bin`, every Envoy message it compiled) and
//! hands their path to the crate as `ENVOY_TYPES_DESCRIPTORS`, so the config
//! dump can write Envoy's resources in Envoy's own JSON (`config_dump.rs`).
//! The crate's location comes from `cargo metadata` for the target platform:
//! the one envoy-types of the workspace's lock file. Offline first; only if
//! some package of the resolve was never downloaded (a build that needed
//! none of the dev-dependencies), cargo may fetch their manifests.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let cargo = std::env::var("CARGO")?;
    let target = std::env::var("TARGET")?;
    let metadata = |offline: bool| {
        let mut command = Command::new(&cargo);
        command.args(["metadata", "--format-version", "1", "--filter-platform"]);
        command.arg(&target).arg("--manifest-path");
        command.arg(manifest_dir.join("Cargo.toml"));
        if offline {
            command.arg("--offline");
        }
        command.output()
    };
    let mut output = metadata(true)?;
    if !output.status.success() {
        output = metadata(false)?;
    }
    if !output.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let manifest = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .ok_or("envoy-types is not among the workspace's packages")?;
    let descriptors = Path::new(manifest)
        .parent()
        .ok_or("envoy-types' manifest has no directory")?
        .join("src/generated/types.bin");
    if !descriptors.is_file() {
        return Err(format!("{} is missing", descriptors.display()).into());
    }
    println!(
        "cargo:rustc-env=ENVOY_TYPES_DESCRIPTORS={}",
        descriptors.display()
    );
    println!("cargo:rerun-if-changed={}", descriptors.display());
    // Another version of envoy-types is another path.
    if let Some(lock) = metadata["workspace_root"].as_str() {
        println!("cargo:rerun-if-changed={lock}/Cargo.lock");
    }
    println!("cargo:rerun-if-changed=build.rs");
    Ok(())
}
