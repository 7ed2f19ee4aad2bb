//! Locating the workspace's binaries from an integration test (built by `cargo build --workspace` first, as
//! scripts/test does), and running them with a deadline.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary next to the running test executable (target/<profile>/NAME).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace` first (scripts/test does)",
        path.display()
    );
    path
}

/// `vmm probe` on this host (its stdout), run once per test process; the test fails if the probe does.
pub fn vmm_probe() -> &'static str {
    static PROBE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PROBE.get_or_init(|| {
        let out = Command::new(bin("vmm"))
            .arg("probe")
            .output()
            .expect("vmm probe");
        assert!(
            out.status.success(),
            "vmm probe failed: {}",
            stdout_then_stderr(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
}

/// The value of one `vmm probe` line (`NAME   value`), trimmed; the test fails if there is no such line.
pub fn probe_line<'a>(probe: &'a str, name: &str) -> &'a str {
    probe
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name:?} line in:\n{probe}"))
        .trim()
}

/// A child process killed (and reaped) when dropped: a test that fails midway leaves no VMM behind (a paused VM
/// would otherwise wait forever).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `path` exists (a VMM's control socket, say), failing the test after `limit`.
pub fn wait_until_exists(path: &Path, limit: Duration) {
    let started = Instant::now();
    while !path.exists() {
        assert!(
            started.elapsed() < limit,
            "{} did not appear within {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A finished command's stdout followed by its stderr, as one text (for assertions and failure messages).
pub fn stdout_then_stderr(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command to completion, killing it after `limit`; returns its output and whether it was killed.
pub fn run_with_deadline(cmd: &mut Command, limit: Duration) -> (Output, bool) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let killed = wait_deadline(&mut child, limit);
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_end(&mut stdout);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_end(&mut stderr);
    }
    let status = child.wait().expect("wait");
    (
        Output {
            status,
            stdout,
            stderr,
        },
        killed,
    )
}

fn wait_deadline(child: &mut Child, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return false;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
