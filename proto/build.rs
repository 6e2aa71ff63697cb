//! Generates the tonic client and server for `proto/moat/node/v1/*.proto`.
//!
//! protoc comes from `protoc-bin-vendored`, so a fresh machine needs no system protobuf.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: a build script is single-threaded here; nothing reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/moat/node/v1/node.proto"], &["proto"])?;
    Ok(())
}
