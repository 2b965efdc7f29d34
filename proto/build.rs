//! Compiles `proto/tessera/**/*.proto` with protox (no system `protoc`) and generates tonic code
//! plus a file-descriptor set for server reflection; compiles our slice of the etcd v3 API
//! (`proto/etcd/etcd_v3.proto`) into client code only (we call etcd, we never serve it, so it
//! stays out of the reflection set).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["tessera/v1/generation.proto", "tessera/worker/v1/worker.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("tessera_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;

    let etcd = "etcd/etcd_v3.proto";
    println!("cargo:rerun-if-changed={etcd}");
    let etcd_fds = protox::compile([etcd], ["."])?;
    tonic_prost_build::configure().build_client(true).build_server(false).compile_fds(etcd_fds)?;
    Ok(())
}
