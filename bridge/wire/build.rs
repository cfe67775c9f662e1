//! Compiles `proto/` with protox (a protobuf compiler written in Rust), so the build needs no
//! system `protoc`. Message types are always generated; the gRPC stubs are compiled too and
//! included only behind the `grpc` feature.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto");
    let mut files = Vec::new();
    collect(&root, &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Two renderings of the same schema: plain messages (no tonic, so the protocol core stays
    // free of async runtimes) and messages plus gRPC stubs for the `grpc` feature.
    for (dir, stubs) in [("plain", false), ("grpc", true)] {
        let dir = out.join(dir);
        std::fs::create_dir_all(&dir)?;
        // Maps as BTreeMap: encoded in key order, so the same message encodes to the same
        // bytes in every process. XMTP's message id covers the encoded content, so a sender's
        // retry after a restart must be byte-identical for receivers to drop it as a duplicate
        // (a HashMap's order changes per process).
        tonic_build::configure()
            .btree_map(["."])
            .build_client(stubs)
            .build_server(stubs)
            .build_transport(stubs)
            .out_dir(&dir)
            .compile_fds(fds.clone())?;
    }
    Ok(())
}

fn collect(dir: &PathBuf, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
