//! Compiles the public API, the on-disk record schema and etcd's client API.
//!
//! protox (a pure-Rust protobuf compiler) parses the protos, so building
//! keyward needs no system `protoc`: `cargo build` works on a bare machine.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(
        [
            "keyward/v1/keyward.proto",
            "keyward/v1/feed.proto",
            "keyward/store/v1/record.proto",
            "keyward/store/v1/backup.proto",
        ],
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
    // The few etcd v3 RPCs replicated mode calls, as a client only (etcd's
    // own client crate needs protoc at build time).
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(protox::compile(["etcd/rpc.proto"], ["proto"])?)?;
    Ok(())
}
