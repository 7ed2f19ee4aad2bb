//! Shared by the `symbolize_*` tests: running `perf-kvm symbolize` and its peers (binutils `addr2line`,
//! `llvm-symbolizer`), parsing their `-a -f -i -p` output, and comparing it frame by frame.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The GNU build-id of an ELF, as binutils `readelf -n` prints it.
pub fn readelf_build_id(elf: &Path) -> String {
    let out = Command::new("readelf")
        .arg("-n")
        .arg(elf)
        .output()
        .expect("run readelf -n");
    assert!(out.status.success(), "readelf -n {}", elf.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_owned))
        .unwrap_or_else(|| panic!("{} has no build-id", elf.display()))
}

/// The `perf-kvm` binary of this build (scripts/test builds the workspace before testing).
pub fn perf_kvm() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/perf-kvm
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("perf-kvm");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build -p perf-kvm` first (scripts/test does)",
        bin.display()
    );
    bin
}

/// Runs a command with `stdin` fed in, returning stdout; panics with stderr on failure.
pub fn run_with_stdin(mut command: Command, stdin: &str) -> (String, String) {
    let description = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {description}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    let stdin = stdin.to_owned();
    let writer = std::thread::spawn(move || input.write_all(stdin.as_bytes()));
    let output = child.wait_with_output().expect("wait");
    writer.join().expect("stdin writer").expect("write stdin");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "{description} failed ({}): {stderr}",
        output.status
    );
    (stdout, stderr)
}

pub fn addresses_text(addrs: &[u64]) -> String {
    addrs.iter().map(|a| format!("{a:#x}\n")).collect()
}

pub fn perf_kvm_symbolize(extra_args: &[&str], addrs: &[u64]) -> (String, String) {
    let mut command = Command::new(perf_kvm());
    command.arg("symbolize").args(extra_args);
    run_with_stdin(command, &addresses_text(addrs))
}

pub fn binutils_addr2line(elf: &Path, addrs: &[u64]) -> String {
    let mut command = Command::new("addr2line");
    command.args(["-a", "-f", "-i", "-p", "-e"]).arg(elf);
    run_with_stdin(command, &addresses_text(addrs)).0
}

pub fn llvm_symbolizer(elf: &Path, addrs: &[u64]) -> String {
    let mut command = Command::new("llvm-symbolizer");
    command
        .args(["--output-style=GNU", "-a", "-f", "-i", "-p", "-e"])
        .arg(elf);
    run_with_stdin(command, &addresses_text(addrs)).0
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextFrame {
    pub function: String,
    pub file: String,
    /// `None` for `?` (binutils) and `0` (llvm-symbolizer): no line.
    pub line: Option<u32>,
    pub discriminator: Option<u32>,
    /// The line exactly as printed.
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct TextRecord {
    pub addr: u64,
    pub address_text: String,
    /// Empty for `?? ??:0`.
    pub frames: Vec<TextFrame>,
}

/// Parses `-a -f -i -p` output (binutils or llvm GNU style) into one record per address.
pub fn parse_records(output: &str) -> Vec<TextRecord> {
    let mut records: Vec<TextRecord> = Vec::new();
    for line in output.lines() {
        let frame_text = if let Some(rest) = line.strip_prefix(" (inlined by) ") {
            rest
        } else {
            let (address, rest) = line
                .split_once(": ")
                .unwrap_or_else(|| panic!("unparsable line {line:?}"));
            let digits = address
                .strip_prefix("0x")
                .unwrap_or_else(|| panic!("unparsable address in {line:?}"));
            let addr = u64::from_str_radix(digits, 16).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            records.push(TextRecord {
                addr,
                address_text: address.to_owned(),
                frames: Vec::new(),
            });
            rest
        };
        let record = records
            .last_mut()
            .unwrap_or_else(|| panic!("frame before any address: {line:?}"));
        if let Some(frame) = parse_frame(frame_text) {
            record.frames.push(frame);
        }
    }
    records
}

fn parse_frame(text: &str) -> Option<TextFrame> {
    let (function, location) = text.rsplit_once(" at ")?;
    let (location, discriminator) = match location.split_once(" (discriminator ") {
        Some((loc, rest)) => (loc, rest.trim_end_matches(')').parse().ok()),
        None => (location, None),
    };
    let (file, line) = location.rsplit_once(':')?;
    Some(TextFrame {
        function: function.to_owned(),
        file: file.to_owned(),
        line: line.parse().ok().filter(|&l| l != 0),
        discriminator,
        text: text.to_owned(),
    })
}

/// `perf-kvm symbolize --guest-vmlinux ELF` on `addrs`, compared with binutils and llvm-symbolizer on the same
/// ELF. Returns the comparison and our parsed records. For any guest ELF, e.g. the test guest:
/// `let (c, _) = compare_with_peers(elf, &addrs); assert_eq!(c.agreeing, addrs.len(), "{}", c.summary());`
pub fn compare_with_peers(elf: &Path, addrs: &[u64]) -> (Comparison, Vec<TextRecord>) {
    let (ours, stderr) = perf_kvm_symbolize(
        &["--guest-vmlinux", elf.to_str().expect("UTF-8 path")],
        addrs,
    );
    assert!(stderr.is_empty(), "unexpected warnings: {stderr}");
    let ours = parse_records(&ours);
    let binutils = parse_records(&binutils_addr2line(elf, addrs));
    let llvm = parse_records(&llvm_symbolizer(elf, addrs));
    (compare(&ours, &binutils, &llvm), ours)
}

/// Outcome of comparing our records with both peers.
#[derive(Debug, Default)]
pub struct Comparison {
    pub addresses: usize,
    /// Addresses where every frame's name equals binutils' or llvm-symbolizer's, and every line llvm-symbolizer's.
    pub agreeing: usize,
    /// Explained difference category → number of frames (or addresses) it covers.
    pub explained: BTreeMap<&'static str, usize>,
    /// Differences no category explains, as readable lines.
    pub unexplained: Vec<String>,
}

pub const LLVM_SYMTAB_NAME: &str =
    "llvm-symbolizer names the outermost frame from the ELF symbol table (clone suffix .cold/.part.N/.isra.N/\
     .constprop.N, or another alias at that address); binutils and we use the DWARF subprogram name";
pub const BINUTILS_WRONG_FILE: &str =
    "binutils 2.40 prints the file of another line-table entry (same line number); we and llvm-symbolizer agree";
pub const LLVM_DISCRIMINATOR_INNERMOST_ONLY: &str =
    "llvm-symbolizer prints the discriminator on the innermost frame only; binutils (and we) repeat it on every \
     inlined-by line";
pub const NO_LINE_SPELLING: &str =
    "a frame without line: binutils prints `??:?` or `file:?`, llvm-symbolizer `??:0`";

pub fn compare(ours: &[TextRecord], binutils: &[TextRecord], llvm: &[TextRecord]) -> Comparison {
    assert_eq!(ours.len(), binutils.len(), "record count vs binutils");
    assert_eq!(ours.len(), llvm.len(), "record count vs llvm-symbolizer");
    let mut result = Comparison {
        addresses: ours.len(),
        ..Comparison::default()
    };
    for ((o, b), l) in ours.iter().zip(binutils).zip(llvm) {
        assert_eq!(
            (o.addr, b.addr, l.addr),
            (o.addr, o.addr, o.addr),
            "records out of step"
        );
        if o.address_text != b.address_text {
            result.unexplained.push(format!(
                "{:#x}: address printed {} vs binutils {}",
                o.addr, o.address_text, b.address_text
            ));
        }
        let mut agrees = o.frames.len() == l.frames.len();
        if !agrees {
            result.unexplained.push(format!(
                "{:#x}: {} frames, llvm-symbolizer {} (binutils {})",
                o.addr,
                o.frames.len(),
                l.frames.len(),
                b.frames.len()
            ));
        }
        let last = o.frames.len().saturating_sub(1);
        for (i, frame) in o.frames.iter().enumerate() {
            let bin = b.frames.get(i);
            let Some(llv) = l.frames.get(i) else { break };
            let name_ok =
                bin.is_some_and(|f| f.function == frame.function) || llv.function == frame.function;
            if !name_ok {
                agrees = false;
                result.unexplained.push(format!(
                    "{:#x} frame {i}: function {} vs binutils {:?} / llvm {}",
                    o.addr,
                    frame.function,
                    bin.map(|f| &f.function),
                    llv.function
                ));
            } else if llv.function != frame.function {
                if i == last {
                    *result.explained.entry(LLVM_SYMTAB_NAME).or_default() += 1;
                } else {
                    result.unexplained.push(format!(
                        "{:#x} inlined frame {i}: {} vs llvm {}",
                        o.addr, frame.function, llv.function
                    ));
                }
            }
            if frame.line != llv.line {
                agrees = false;
                result.unexplained.push(format!(
                    "{:#x} frame {i}: line {:?} vs llvm {:?}",
                    o.addr, frame.line, llv.line
                ));
            }
            if frame.file != llv.file && !(frame.line.is_none() && llv.file == "??") {
                result.unexplained.push(format!(
                    "{:#x} frame {i}: file {} vs llvm {}",
                    o.addr, frame.file, llv.file
                ));
            }
            if frame.discriminator != llv.discriminator {
                if i > 0
                    && llv.discriminator.is_none()
                    && frame.discriminator == o.frames[0].discriminator
                {
                    *result
                        .explained
                        .entry(LLVM_DISCRIMINATOR_INNERMOST_ONLY)
                        .or_default() += 1;
                } else {
                    result.unexplained.push(format!(
                        "{:#x} frame {i}: discriminator {:?} vs llvm {:?}",
                        o.addr, frame.discriminator, llv.discriminator
                    ));
                }
            }
            // Against binutils the text must be identical, except where binutils' file is known wrong.
            if let Some(bin) = bin {
                if bin.text != frame.text {
                    let same_but_file = TextFrame {
                        file: bin.file.clone(),
                        text: String::new(),
                        ..frame.clone()
                    } == TextFrame {
                        text: String::new(),
                        ..bin.clone()
                    };
                    if same_but_file && frame.file == llv.file {
                        *result.explained.entry(BINUTILS_WRONG_FILE).or_default() += 1;
                    } else {
                        result.unexplained.push(format!(
                            "{:#x} frame {i}: `{}` vs binutils `{}`",
                            o.addr, frame.text, bin.text
                        ));
                    }
                }
            }
            if frame.line.is_none() && llv.text != frame.text && llv.function == frame.function {
                *result.explained.entry(NO_LINE_SPELLING).or_default() += 1;
            }
        }
        if b.frames.len() != o.frames.len() {
            result.unexplained.push(format!(
                "{:#x}: {} frames, binutils {}",
                o.addr,
                o.frames.len(),
                b.frames.len()
            ));
        }
        if agrees {
            result.agreeing += 1;
        }
    }
    result
}

impl Comparison {
    pub fn summary(&self) -> String {
        let mut text = format!("{} of {} addresses agree\n", self.agreeing, self.addresses);
        for (category, count) in &self.explained {
            text += &format!("  explained ×{count}: {category}\n");
        }
        for line in self.unexplained.iter().take(40) {
            text += &format!("  UNEXPLAINED: {line}\n");
        }
        if self.unexplained.len() > 40 {
            text += &format!(
                "  ... and {} more unexplained\n",
                self.unexplained.len() - 40
            );
        }
        text
    }
}

/// splitmix64: deterministic, well-mixed offsets without a dependency.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Sized functions of an ELF as binutils `readelf` sees them: (address, size, name), sorted, unique addresses.
pub fn readelf_functions(elf: &Path) -> Vec<(u64, u64, String)> {
    let output = Command::new("readelf")
        .arg("-sW")
        .arg(elf)
        .output()
        .expect("run readelf");
    assert!(output.status.success(), "readelf failed");
    let mut functions: Vec<(u64, u64, String)> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Num: Value Size Type Bind Vis Ndx Name
            if fields.len() < 8 || fields[3] != "FUNC" || fields[6] == "UND" {
                return None;
            }
            let size = fields[2].parse::<u64>().ok().filter(|&s| s > 0)?;
            Some((
                u64::from_str_radix(fields[1], 16).ok()?,
                size,
                fields[7].to_owned(),
            ))
        })
        .collect();
    functions.sort();
    functions.dedup_by_key(|f| f.0);
    functions
}

/// `count` addresses strictly inside sized functions (start + offset < start + size), spread evenly over them.
pub fn addresses_inside_functions(functions: &[(u64, u64, String)], count: usize) -> Vec<u64> {
    assert!(!functions.is_empty(), "no sized functions");
    (0..count)
        .map(|i| {
            let (start, size, _) = &functions[i * functions.len() / count.max(1) % functions.len()];
            start + mix(i as u64) % size
        })
        .collect()
}

/// The fixture cache, by `scripts/fetch-debian-kernel`'s rule: `$KVM_PROF_CACHE`, else `$XDG_CACHE_HOME/kvm-prof`,
/// else `~/.cache/kvm-prof`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KVM_PROF_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("kvm-prof");
    }
    PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/kvm-prof")
}

/// The Debian kernel release every fixture uses (`6.1.0-N-cloud-amd64`): `scripts/fetch-debian-kernel release`
/// chooses it (pinned, else the newest with both -unsigned and -dbg packages), so the -dbg vmlinux here and the
/// bzImage the boot tests run are one build.
pub fn debian_release() -> String {
    static RELEASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RELEASE
        .get_or_init(|| integration_tests::script_output("fetch-debian-kernel", &["release"]))
        .clone()
}

/// Debian's `linux-image-RELEASE-dbg` vmlinux (.symtab and DWARF), extracted once into the cache. Panics (the test
/// FAILS) when it can be neither found nor downloaded.
pub fn debian_vmlinux() -> PathBuf {
    // Tests of one binary run in parallel threads: extract once per process.
    static VMLINUX: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VMLINUX
        .get_or_init(|| {
            let release = debian_release();
            debian_dbg_file(
                &format!("./usr/lib/debug/boot/vmlinux-{release}"),
                &format!("vmlinux-{release}"),
            )
        })
        .clone()
}

/// One file of the release's -dbg package (`inner`, a path inside the .deb), cached as `name`: the package is
/// downloaded once into the cache's `dl/` (kept: the vmlinux and kvm.ko tests both extract from it). Safe when
/// several test processes ask at once on an empty cache: they take turns under a lock, the download lands in a
/// private directory, and each file appears by a rename only when it is whole.
pub fn debian_dbg_file(inner: &str, name: &str) -> PathBuf {
    let release = debian_release();
    let dir = cache_dir();
    let dest = dir.join(name);
    let download = dir.join("dl");
    std::fs::create_dir_all(&download)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", download.display()));
    let _lock = CacheLock::take(&dir.join(".debian-dbg.lock"));
    if dest.exists() {
        return dest;
    }
    let package = format!("linux-image-{release}-dbg");
    let cached_deb = || {
        std::fs::read_dir(&download)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                let file = p.file_name().unwrap_or_default().to_string_lossy();
                file.starts_with(&format!("{package}_")) && file.ends_with("_amd64.deb")
            })
    };
    let deb = match cached_deb() {
        Some(deb) => deb,
        None => {
            let private = download.join(format!(".partial-{}", std::process::id()));
            std::fs::create_dir_all(&private).expect("create a private download directory");
            let status = Command::new("apt-get")
                .args(["download", "-q", &package])
                .current_dir(&private)
                .status()
                .expect("run apt-get download");
            assert!(
                status.success(),
                "apt-get download {package} failed: cannot run this test (FAIL)"
            );
            let got = std::fs::read_dir(&private)
                .expect("read the private download directory")
                .filter_map(|e| e.ok())
                .find(|e| e.file_name().to_string_lossy().ends_with(".deb"))
                .expect("apt-get download produced no .deb");
            let deb = download.join(got.file_name());
            std::fs::rename(got.path(), &deb).expect("move the .deb into the cache");
            std::fs::remove_dir_all(&private).ok();
            deb
        }
    };
    extract_from_deb(&deb, inner, &dest);
    dest
}

/// An exclusive `flock` on a file of the cache, released when dropped: test processes share one cache.
struct CacheLock(std::fs::File);

impl CacheLock {
    fn take(path: &Path) -> CacheLock {
        let file = std::fs::File::create(path)
            .unwrap_or_else(|e| panic!("cannot create lock file {}: {e}", path.display()));
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this struct owns; it blocks until the lock is ours and touches no memory.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            rc,
            0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        CacheLock(file)
    }
}

/// Extracts one file of a `.deb` to `dest`, through a partial file renamed into place when complete.
pub fn extract_from_deb(deb: &Path, inner: &str, dest: &Path) {
    let mut partial = dest.as_os_str().to_owned();
    partial.push(format!(".partial-{}", std::process::id()));
    let partial = PathBuf::from(partial);
    let script = format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -O '{inner}' > '{}'",
        deb.display(),
        partial.display()
    );
    let status = Command::new("sh")
        .args(["-c", &script])
        .status()
        .expect("run dpkg-deb | tar");
    assert!(
        status.success(),
        "extracting {inner} from {} failed",
        deb.display()
    );
    std::fs::rename(&partial, dest)
        .unwrap_or_else(|e| panic!("cannot move {} into place: {e}", dest.display()));
}

/// A small C program with inlining at -O2 (inline frames) and a cold function, compiled by the ELF and module tests.
#[allow(dead_code)]
pub const SMALL_C_PROGRAM: &str = r#"
#include <stdlib.h>
#include <string.h>
struct point { int x, y; };
static inline int square(int v) { return v * v; }
static inline int dist2(struct point a, struct point b) { return square(a.x - b.x) + square(a.y - b.y); }
static int __attribute__((noinline)) nearest(const struct point *pts, int n, struct point q) {
    int best = -1, best_d = 0x7fffffff;
    for (int i = 0; i < n; i++) {
        int d = dist2(pts[i], q);
        if (d < best_d) { best_d = d; best = i; }
    }
    return best;
}
static inline unsigned mixbits(unsigned h, unsigned v) { h ^= v; h *= 16777619u; return h; }
unsigned __attribute__((noinline)) hash(const char *s) {
    unsigned h = 2166136261u;
    while (*s) h = mixbits(h, (unsigned char)*s++);
    return h;
}
static void __attribute__((noinline, cold)) fail(const char *why) { if (why) abort(); }
int main(int argc, char **argv) {
    struct point pts[4] = {{0, 0}, {3, 4}, {-2, 7}, {5, -1}};
    struct point q = { argc, (int)strlen(argv[0]) };
    int i = nearest(pts, 4, q);
    if (i < 0) fail("no point");
    return (int)(hash(argv[0]) & 0x7f) + i;
}
"#;
