//! Compiles the public API and the on-disk record schema.
//!
//! protox (a pure-Rust protobuf compiler) parses the protos, so building
//! keyward needs no system `protoc`: `cargo build` works on a bare machine.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(
        ["keyward/v1/keyward.proto", "keyward/store/v1/record.proto"],
        ["proto"],
    )?;
    std::fs::write(
        out_dir.join("keyward_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Undecodable requests are INVALID_ARGUMENT (see src/grpc/codec.rs).
        .codec_path("crate::grpc::codec::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}
