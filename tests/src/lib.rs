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

/// The test guest ELF: `$GUEST_ELF` when set (scripts/test sets it), else built now by `scripts/build-guest`
/// (once per test process).
pub fn guest_elf() -> PathBuf {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        if let Some(p) = std::env::var_os("GUEST_ELF").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let script = repo_root().join("scripts/build-guest");
        let out = Command::new(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "scripts/build-guest failed: {}",
            out.status
        );
        PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
    })
    .clone()
}
pub mod bins;
