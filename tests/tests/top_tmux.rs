//! `perf-kvm top` driven through a real terminal (tmux): the hot guest function on top, the keys, a restored
//! terminal after `q`, a tiny terminal, the VM ending under it, and no terminal at all.

mod stat_common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use stat_common::{guest_elf, perf_kvm, Scratch};

/// Upper bound for anything to show up on the pane: the host is shared and slow, so this is generous; the tests
/// wait for content, never for a time.
const PATIENCE: Duration = Duration::from_secs(90);

struct Tmux {
    session: String,
}

impl Tmux {
    /// A detached session of `width`x`height` running a plain shell.
    fn new(tag: &str, width: u16, height: u16) -> Tmux {
        let session = format!("perf-kvm-{tag}-{}", std::process::id());
        let status = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                &session,
                "-x",
                &width.to_string(),
                "-y",
                &height.to_string(),
            ])
            .args([
                "env",
                "PS1=$ ",
                "TERM=xterm-256color",
                "bash",
                "--norc",
                "--noprofile",
            ])
            .status()
            .expect("tmux (install it: apt-get install tmux)");
        assert!(status.success(), "tmux new-session failed");
        Tmux { session }
    }

    fn send(&self, keys: &[&str]) {
        let status = Command::new("tmux")
            .args(["send-keys", "-t", &self.session])
            .args(keys)
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn type_line(&self, line: &str) {
        self.send(&["-l", line]);
        self.send(&["Enter"]);
    }

    fn capture(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.session])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn format(&self, fmt: &str) -> String {
        let out = Command::new("tmux")
            .args(["display-message", "-p", "-t", &self.session, fmt])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Polls the pane until `pred` holds; panics with the last screen after PATIENCE.
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        loop {
            let screen = self.capture();
            if pred(&screen) {
                return screen;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "never saw {what}; last screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.session])
            .status();
    }
}

fn top_command(elf: &Path, extra: &str, cmdline: &str) -> String {
    format!(
        "{} top {extra} -- run --kernel {} --cmdline '{cmdline}'; echo TOP-EXIT=$?",
        perf_kvm().display(),
        elf.display()
    )
}

/// The status `echo TOP-EXIT=$?` printed once top returned (the typed command itself has `$?` there).
fn exit_status(screen: &str) -> Option<u32> {
    screen.match_indices("TOP-EXIT=").find_map(|(i, m)| {
        let digits: String = screen[i + m.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    })
}

/// The first row of the symbol table: the line after the column header.
fn top_row(screen: &str) -> Option<&str> {
    let mut lines = screen.lines().skip_while(|l| !l.contains("Overhead"));
    lines.next()?;
    lines.next()
}

#[test]
fn hot_symbol_on_top_keys_work_and_terminal_is_restored() {
    let elf = guest_elf();
    let tmux = Tmux::new("top", 120, 36);
    tmux.type_line(&top_command(
        &elf,
        "-g -F 10000",
        "work=user_hot_a:70,user_cold:30 secs=20",
    ));
    tmux.wait_for("user_leaf or user_hot_a on the top row", |s| {
        top_row(s).is_some_and(|r| r.contains("user_leaf") || r.contains("user_hot_a"))
    });
    let screen = tmux.capture();
    assert!(
        screen.contains("PerfKvmTop:") && screen.contains("samples/s"),
        "{screen}"
    );
    assert!(
        screen.contains("guest kernel:")
            && screen.contains("guest user:")
            && screen.contains("lost:"),
        "{screen}"
    );
    assert!(screen.contains("VM exits:"), "{screen}");
    assert!(
        screen.contains("q quit") && screen.contains("v vCPU"),
        "{screen}"
    );
    assert_eq!(tmux.format("#{alternate_on}"), "1");

    tmux.send(&["v"]);
    tmux.wait_for("the vCPU 0 view", |s| s.contains("vCPU 0 of 1"));
    tmux.send(&["v"]);
    tmux.wait_for("all vCPUs again", |s| s.contains("all 1 vCPUs"));

    tmux.send(&["/"]);
    tmux.wait_for("the filter prompt", |s| s.contains("Filter symbols:"));
    tmux.send(&["-l", "leaf"]);
    tmux.send(&["Enter"]);
    let filtered = tmux.wait_for("only user_leaf rows", |s| {
        top_row(s).is_some_and(|r| r.contains("user_leaf")) && s.contains("[leaf]")
    });
    assert!(!filtered.contains("user_cold"), "{filtered}");

    tmux.send(&["Enter"]);
    // user_hot_a → user_stage1 → user_stage2 → user_leaf (tests/guest/src/user.rs).
    tmux.wait_for("user_stage2 as the caller of user_leaf", |s| {
        s.contains("Callers of user_leaf") && top_row(s).is_some_and(|r| r.contains("user_stage2"))
    });
    tmux.send(&["Escape"]);
    tmux.wait_for("the symbol list back", |s| {
        s.contains("Hottest guest symbols")
    });

    tmux.send(&["q"]);
    let after = tmux.wait_for("top's exit status", |s| exit_status(s).is_some());
    assert_eq!(exit_status(&after), Some(0), "{after}");
    assert_eq!(tmux.format("#{alternate_on}"), "0", "alternate screen left");
    assert!(
        after.contains("lost: 0 queue full"),
        "the screen drops frames, not samples:\n{after}"
    );
    assert_eq!(tmux.format("#{cursor_flag}"), "1", "cursor shown again");
    // Raw mode is off again: the line discipline echoes and edits lines.
    let scratch = Scratch::new("top-stty");
    let stty = scratch.0.join("stty");
    tmux.type_line(&format!("stty -a > {}", stty.display()));
    tmux.wait_for("stty's output", |_| {
        std::fs::metadata(&stty).is_ok_and(|m| m.len() > 0)
    });
    let modes = std::fs::read_to_string(&stty).unwrap();
    let words: Vec<&str> = modes.split_whitespace().collect();
    for mode in ["icanon", "echo", "isig"] {
        assert!(words.contains(&mode), "{mode} not restored:\n{modes}");
    }
}

#[test]
fn tiny_terminal_and_vm_end_are_shown_and_q_exits() {
    let elf = guest_elf();
    let tmux = Tmux::new("top-tiny", 20, 5);
    tmux.type_line(&top_command(&elf, "", "work=user_hot_a:100 secs=1"));
    // The notice wraps on 20 columns: join the lines before looking.
    tmux.wait_for("the too-small notice", |s| {
        s.lines()
            .map(str::trim_end)
            .collect::<Vec<_>>()
            .join(" ")
            .contains("too small")
    });
    tmux.send(&["q"]);
    let after = tmux.wait_for("top's exit status", |s| exit_status(s).is_some());
    assert_eq!(exit_status(&after), Some(0), "{after}");

    let tmux = Tmux::new("top-end", 120, 30);
    tmux.type_line(&top_command(&elf, "", "work=user_hot_a:100 secs=1"));
    let ended = tmux.wait_for("the VM's end", |s| s.contains("The VM has ended"));
    assert!(
        ended.contains("guest-io: port_writes="),
        "the guest's last line is shown:\n{ended}"
    );
    // Ctrl-C arrives as a key in raw mode and quits like `q`.
    tmux.send(&["C-c"]);
    let after = tmux.wait_for("top's exit status", |s| exit_status(s).is_some());
    assert_eq!(exit_status(&after), Some(0), "{after}");
}

#[test]
fn without_a_terminal_top_refuses_and_stdio_prints_tables() {
    let elf = guest_elf();
    let run = |extra: &[&str]| {
        Command::new(perf_kvm())
            .arg("top")
            .args(extra)
            .args([
                "--",
                "run",
                "--kernel",
                elf.to_str().unwrap(),
                "--cmdline",
                "work=user_hot_a:100 secs=1",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running perf-kvm top")
    };
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs a terminal") && err.contains("--stdio"),
        "{err}"
    );

    // At 10 kHz the consumer keeps up: whatever the sampler delivers, none is dropped for a full queue.
    let out = run(&["--stdio", "-d", "0.5", "-F", "10000"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("the VM has ended"), "{stderr}");
    assert!(stderr.contains("lost: 0 queue full"), "{stderr}");
    assert!(
        stdout.contains("PerfKvmTop:") && stdout.contains("Overhead"),
        "{stdout}"
    );
    // The last table, taken when the guest had run its whole workload, has user_hot_a's code on top.
    let last = stdout.rsplit("PerfKvmTop:").next().unwrap();
    let first_row = last
        .lines()
        .skip_while(|l| !l.contains("Overhead"))
        .nth(1)
        .unwrap_or("");
    assert!(
        first_row.contains("user_leaf") || first_row.contains("user_hot_a"),
        "{last}"
    );
}
