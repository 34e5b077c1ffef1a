//! Compiles `proto/portcullis/**` with the `protoc` named by `$PROTOC` (see .cargo/config.toml).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=portcullis");
    println!("cargo:rerun-if-env-changed=PROTOC");
    tonic_prost_build::configure()
        // BTreeMap: deterministic encoding, so equal resources have equal bytes (unchanged detection)
        .btree_map(".")
        .file_descriptor_set_path(out.join("portcullis_descriptor.bin"))
        .compile_protos(
            &[
                "portcullis/config/v1/resources.proto",
                "portcullis/admin/v1/admin.proto",
                "portcullis/discovery/v1/discovery.proto",
            ],
            &["."],
        )?;
    Ok(())
}
