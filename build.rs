//! Compiles the public API and the on-disk record schema.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("keyward_descriptor.bin"))
        .compile_protos(
            &[
                "proto/keyward/v1/keyward.proto",
                "proto/keyward/store/v1/record.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
