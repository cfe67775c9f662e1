//! The `gatehouse` binary's config checking, run as a user would. (Having an integration test
//! here also makes `cargo test --workspace` build `target/<profile>/gatehouse`, which the
//! end-to-end tests in `tests/` drive.)

use std::process::Command;

fn gatehouse(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(args)
        .output()
        .unwrap()
}

/// The repository's config.yaml passes `gatehouse check`.
#[test]
fn check_accepts_the_repo_config() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config.yaml");
    let out = gatehouse(&["check", "--config", config]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
}

/// A broken config is refused with the file, line and the offending key; nothing starts.
#[test]
fn check_names_file_line_and_key() {
    let dir = std::env::temp_dir().join(format!("gh-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.yaml");
    std::fs::write(&path, "data_dir: x\nnode:\n  embeded: true\n").unwrap();
    let out = gatehouse(&["check", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "broken.yaml:3:3: node.embeded: unknown key `embeded`; did you mean `embedded`?"
        ),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Output into a pipe nobody reads any more (`gatehouse … | head`) ends the command quietly
/// with 141, the status of a process stopped by SIGPIPE, instead of a panic message.
#[test]
fn a_closed_pipe_ends_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config.yaml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["check", "--config", config])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
}
