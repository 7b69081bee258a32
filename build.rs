//! Compiles `proto/kiln/v1/kiln.proto` into the gRPC service and client (tonic + prost)
//! with the vendored `protoc`, and keeps the file descriptor set for server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through this variable.
    std::env::set_var("PROTOC", protoc);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("kiln_descriptor.bin"))
        .compile_protos(&["proto/kiln/v1/kiln.proto"], &["proto"])?;
    Ok(())
}
