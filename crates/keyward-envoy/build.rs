//! The decision feed's client (keyward.v1.DecisionFeed), compiled by protox
//! (pure Rust): building the module needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto/keyward/v1/feed.proto");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(protox::compile(["keyward/v1/feed.proto"], ["../../proto"])?)?;
    Ok(())
}
