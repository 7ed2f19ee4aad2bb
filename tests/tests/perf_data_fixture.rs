//! Shared fixture of the perf.data and report tests (included with `#[path]`): a stand-in guest kernel and
//! guest user binary built with gcc at known addresses, synthetic samples in them, and a real-perf runner.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use perf_kvm::perf_data::{CallchainContext, GuestUserMap, PerfDataWriter, RecordMeta};
use vmm::{GuestMode, Sample, SampleLoss};

const KERNEL_C: &str = r#"
volatile int sink;
__attribute__((noinline)) void kernel_hot(void) { for (int i = 0; i < 100; i++) sink += i; }
__attribute__((noinline)) void kernel_warm(void) { for (int i = 0; i < 10; i++) sink -= i; }
__attribute__((noinline)) void kernel_caller(void) { kernel_hot(); kernel_warm(); }
void _start(void) { for (;;) kernel_caller(); }
"#;

const USER_C: &str = r#"
volatile int usink;
__attribute__((noinline)) void user_hot(void) { for (int i = 0; i < 100; i++) usink += i; }
__attribute__((noinline)) void user_main(void) { for (;;) user_hot(); }
void _start(void) { user_main(); }
"#;

pub const KERNEL_BASE: u64 = 0xffff_ffff_8100_0000;
pub const USER_TEXT: u64 = 0x40_1000;
pub const KERNEL_CR3: u64 = 0x1000;
pub const USER_CR3_A: u64 = 0x3000;
pub const USER_CR3_B: u64 = 0x4000;
/// queue_full 4 + ticks_skipped 2; idle ticks are not losses.
pub const LOST: u64 = 6;

pub struct GuestBinaries {
    pub dir: PathBuf,
    pub vmlinux: PathBuf,
    pub user: PathBuf,
    pub symbols: HashMap<String, u64>,
    pub kernel_build_id: Vec<u8>,
}

impl GuestBinaries {
    pub fn build(dir: &Path) -> Self {
        std::fs::write(dir.join("kernel.c"), KERNEL_C).unwrap();
        std::fs::write(dir.join("user.c"), USER_C).unwrap();
        let vmlinux = dir.join("vmlinux");
        let user = dir.join("user");
        gcc(&[
            "-mcmodel=kernel".to_owned(),
            format!("-Wl,-Ttext={KERNEL_BASE:#x}"),
            "-Wl,--build-id".to_owned(),
            "-o".to_owned(),
            vmlinux.display().to_string(),
            dir.join("kernel.c").display().to_string(),
        ]);
        gcc(&[
            format!("-Wl,-Ttext={USER_TEXT:#x}"),
            "-o".to_owned(),
            user.display().to_string(),
            dir.join("user.c").display().to_string(),
        ]);
        let mut symbols = nm(&vmlinux);
        symbols.extend(nm(&user));
        let kernel_build_id = readelf_build_id(&vmlinux);
        Self {
            dir: dir.to_owned(),
            vmlinux,
            user,
            symbols,
            kernel_build_id,
        }
    }

    pub fn sym(&self, name: &str) -> u64 {
        self.symbols[name]
    }

    pub fn meta(&self, callchain_context: CallchainContext) -> RecordMeta {
        RecordMeta {
            nr_vcpus: 2,
            freq_hz: 1000,
            callchains: true,
            guest_kernel_build_id: Some(self.kernel_build_id.clone()),
            guest_kernel_path: Some(self.vmlinux.clone()),
            guest_kernel_range: Some(KERNEL_BASE..KERNEL_BASE + 0x1000),
            guest_user_maps: vec![GuestUserMap {
                start: 0x40_0000,
                len: 0x4000,
                pgoff: 0,
                path: self.user.clone(),
            }],
            cmdline: vec!["perf-kvm".to_owned(), "record".to_owned(), "-g".to_owned()],
            callchain_context,
            ..Default::default()
        }
    }

    /// 500 samples: kernel_hot 60 %, kernel_warm 20 % (both called from kernel_caller), user_hot 20 % (called
    /// from user_main) split 3:2 between two address spaces, over two vCPUs.
    pub fn samples(&self) -> Vec<Sample> {
        let kernel_caller_ret = self.sym("kernel_caller") + 5;
        let user_main_ret = self.sym("user_main") + 5;
        (0..500u64)
            .map(|i| {
                let (rip, mode, cr3, ret) = match i % 5 {
                    0..=2 => (
                        self.sym("kernel_hot") + 4,
                        GuestMode::Kernel,
                        KERNEL_CR3,
                        kernel_caller_ret,
                    ),
                    3 => (
                        self.sym("kernel_warm") + 4,
                        GuestMode::Kernel,
                        KERNEL_CR3,
                        kernel_caller_ret,
                    ),
                    _ if i % 25 < 15 => (
                        self.sym("user_hot") + 4,
                        GuestMode::User,
                        USER_CR3_A,
                        user_main_ret,
                    ),
                    _ => (
                        self.sym("user_hot") + 4,
                        GuestMode::User,
                        USER_CR3_B,
                        user_main_ret,
                    ),
                };
                Sample {
                    time_ns: 1_000_000 * (i + 1),
                    vcpu: (i % 2) as u32,
                    rip,
                    mode,
                    cr3,
                    callchain: vec![ret],
                    period: None,
                }
            })
            .collect()
    }

    /// Writes the standard recording to `name` and finishes it.
    pub fn write_recording(&self, name: &str, context: CallchainContext) -> PathBuf {
        let path = self.dir.join(name);
        let mut writer = PerfDataWriter::create(&path, &self.meta(context)).unwrap();
        let samples = self.samples();
        for (i, sample) in samples.iter().enumerate() {
            writer.write_sample(sample).unwrap();
            if i == 250 {
                writer
                    .write_lost(
                        &SampleLoss {
                            queue_full: 4,
                            ..Default::default()
                        },
                        sample.time_ns,
                    )
                    .unwrap();
            }
        }
        let last = samples.last().unwrap().time_ns;
        writer
            .write_lost(
                &SampleLoss {
                    idle_ticks: 1,
                    ticks_skipped: 2,
                    ..Default::default()
                },
                last,
            )
            .unwrap();
        writer.finish().unwrap();
        path
    }
}

fn gcc(args: &[String]) {
    let out = Command::new("gcc")
        .args([
            "-O1",
            "-g",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-fno-pic",
            "-ffreestanding",
        ])
        .args(args)
        .output()
        .expect("run gcc");
    assert!(
        out.status.success(),
        "gcc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn nm(path: &Path) -> HashMap<String, u64> {
    let out = Command::new("nm").arg(path).output().expect("run nm");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let addr = u64::from_str_radix(fields.next()?, 16).ok()?;
            let _kind = fields.next()?;
            Some((fields.next()?.to_owned(), addr))
        })
        .collect()
}

fn readelf_build_id(path: &Path) -> Vec<u8> {
    let out = Command::new("readelf")
        .arg("-n")
        .arg(path)
        .output()
        .expect("run readelf");
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("build id note")
        .trim();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// Runs `perf` with `args`; returns (stdout, stderr). Panics if perf fails.
pub fn perf(args: &[&str]) -> (String, String) {
    let out = Command::new("perf").args(args).output().expect("run perf");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "perf {args:?} failed:\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

/// One row of a `perf report --stdio` table: the leading percentage and the remaining columns.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportRow {
    pub percent: f64,
    pub columns: Vec<String>,
}

pub fn report_rows(stdout: &str) -> Vec<ReportRow> {
    stdout
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let percent = fields.next()?.strip_suffix('%')?.parse().ok()?;
            Some(ReportRow {
                percent,
                columns: fields.map(str::to_owned).collect(),
            })
        })
        .collect()
}

pub fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pkvm-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
