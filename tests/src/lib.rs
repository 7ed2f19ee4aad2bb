//! Helpers shared by the integration tests under tests/tests/.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The repository root.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
}

/// Runs `scripts/NAME ARGS` from the repository (its stderr shown) and returns its stdout, trimmed: the scripts
/// that find or fetch fixtures print one path or value. Panics (the test fails) when the script fails.
pub fn script_output(name: &str, args: &[&str]) -> String {
    let script = repo_root().join("scripts").join(name);
    let out = Command::new(&script)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "scripts/{name} {args:?} failed: {}",
        out.status
    );
    String::from_utf8(out.stdout)
        .expect("utf-8 output")
        .trim()
        .to_owned()
}

/// The test guest ELF: `$GUEST_ELF` when set (scripts/test sets it), else built now by `scripts/build-guest`
/// (once per test process).
pub fn guest_elf() -> PathBuf {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        if let Some(p) = std::env::var_os("GUEST_ELF").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        PathBuf::from(script_output("build-guest", &[]))
    })
    .clone()
}
pub mod bins;
