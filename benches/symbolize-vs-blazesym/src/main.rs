//! One symbolizer per process, so that peak RSS is that tool's alone:
//!
//! ```text
//! symbolize-vs-blazesym run (ours|ours-discriminators|blazesym) ELF ADDRS [--warm N] [--answers FILE]
//! symbolize-vs-blazesym compare ADDRS OURS_ANSWERS BLAZESYM_ANSWERS
//! ```
//!
//! `run` reads hex addresses (one a line), then times "cold" (open the ELF, parse, symbolize the whole batch in one
//! call) and "warm" (the same batch again on the same symbolizer, best of N), both with function names, file:line
//! and inline frames. It prints one line `tool=.. addrs=.. cold_s=.. warm_s=.. warm_max_s=.. hwm_kb=..`, and with
//! `--answers` writes one line per address, innermost frame first: `addr<TAB>func:line<TAB>func:line...`.
//! `compare` counts addresses whose frame names or lines differ between two answer files.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// (function, line) per frame, innermost first.
type Answer = Vec<(String, u32)>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") if args.len() >= 4 => run(&args[1], Path::new(&args[2]), Path::new(&args[3]), &args[4..]),
        Some("compare") if args.len() == 4 => compare(&args[1], &args[2], &args[3]),
        _ => bail!(
            "usage: symbolize-vs-blazesym run (ours|ours-discriminators|blazesym) ELF ADDRS [--warm N] [--answers FILE]\n       \
             symbolize-vs-blazesym compare ADDRS OURS_ANSWERS BLAZESYM_ANSWERS"
        ),
    }
}

fn read_addrs(path: &Path) -> Result<Vec<u64>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let t = l.trim();
            u64::from_str_radix(t.trim_start_matches("0x"), 16)
                .with_context(|| format!("bad address {t:?}"))
        })
        .collect()
}

fn run(tool: &str, elf: &Path, addrs_path: &Path, options: &[String]) -> Result<()> {
    let addrs = read_addrs(addrs_path)?;
    let mut warm_reps = 3usize;
    let mut answers_path = None;
    let mut rest = options.iter();
    while let Some(option) = rest.next() {
        match option.as_str() {
            "--warm" => warm_reps = rest.next().context("--warm N")?.parse()?,
            "--answers" => answers_path = Some(rest.next().context("--answers FILE")?.clone()),
            other => bail!("unknown option {other:?}"),
        }
    }
    let (cold, cold_cpu, warm, answers, (anon_kb, file_kb)) = match tool {
        "ours" => time_ours(elf, &addrs, warm_reps, false)?,
        "ours-discriminators" => time_ours(elf, &addrs, warm_reps, true)?,
        "blazesym" => time_blazesym(elf, &addrs, warm_reps)?,
        _ => bail!("unknown tool {tool:?} (want ours, ours-discriminators or blazesym)"),
    };
    let hwm_kb = status_kb("VmHWM")?;
    let warm_min = warm.iter().copied().fold(f64::INFINITY, f64::min);
    let warm_max = warm.iter().copied().fold(0.0, f64::max);
    println!(
        "tool={tool} addrs={} cold_s={cold:.4} cold_cpu_s={cold_cpu:.4} warm_s={warm_min:.4} \
         warm_max_s={warm_max:.4} hwm_kb={hwm_kb} anon_kb={anon_kb} file_kb={file_kb}",
        addrs.len()
    );
    if let Some(path) = answers_path {
        let mut out =
            std::io::BufWriter::new(std::fs::File::create(&path).with_context(|| path.clone())?);
        for (addr, answer) in addrs.iter().zip(&answers) {
            write!(out, "{addr:#x}")?;
            for (function, line) in answer {
                write!(out, "\t{function}:{line}")?;
            }
            writeln!(out)?;
        }
    }
    Ok(())
}

/// Cold seconds (wall, then CPU over all threads), warm seconds per repetition, the cold run's answers, and
/// (heap, mapped file) RSS in kB with the symbolizer still alive.
type Timings = (f64, f64, Vec<f64>, Vec<Answer>, (u64, u64));

/// CPU seconds this process has used so far, user and system, all threads.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole rusage into the buffer we own; RUSAGE_SELF cannot fail.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

fn rss_now() -> Result<(u64, u64)> {
    Ok((status_kb("RssAnon")?, status_kb("RssFile")?))
}

/// `discriminators`: also find each address's line-table discriminator, as binutils prints and blazesym does not.
fn time_ours(elf: &Path, addrs: &[u64], warm_reps: usize, discriminators: bool) -> Result<Timings> {
    let (start, cpu_start) = (Instant::now(), cpu_seconds());
    let mut symbolizer = symbols::Symbolizer::new();
    symbolizer.set_discriminators(discriminators);
    // SYMBOLS_THREADS=1 measures ours on one CPU, as blazesym runs.
    if let Some(threads) = std::env::var("SYMBOLS_THREADS").ok().and_then(|t| t.parse().ok()) {
        symbolizer.set_threads(threads);
    }
    symbolizer.add_elf(elf, 0)?;
    let results = symbolizer.symbolize(addrs);
    let (cold, cold_cpu) = (start.elapsed().as_secs_f64(), cpu_seconds() - cpu_start);
    let mut warm = Vec::new();
    for _ in 0..warm_reps {
        let start = Instant::now();
        let again = symbolizer.symbolize(addrs);
        warm.push(start.elapsed().as_secs_f64());
        std::hint::black_box(again);
    }
    let answers = results
        .iter()
        .map(|r| {
            r.frames
                .iter()
                .map(|f| {
                    (
                        f.function.as_deref().unwrap_or("??").to_owned(),
                        f.line.unwrap_or(0),
                    )
                })
                .collect()
        })
        .collect();
    Ok((cold, cold_cpu, warm, answers, rss_now()?))
}

fn time_blazesym(elf: &Path, addrs: &[u64], warm_reps: usize) -> Result<Timings> {
    use blazesym::symbolize::source::{Elf, Source};
    use blazesym::symbolize::{Input, Symbolized, Symbolizer};
    let (start, cpu_start) = (Instant::now(), cpu_seconds());
    let symbolizer = Symbolizer::builder()
        .enable_code_info(true)
        .enable_inlined_fns(true)
        .build();
    let source = Source::Elf(Elf::new(elf));
    let results = symbolizer.symbolize(&source, Input::VirtOffset(addrs))?;
    let (cold, cold_cpu) = (start.elapsed().as_secs_f64(), cpu_seconds() - cpu_start);
    let mut warm = Vec::new();
    for _ in 0..warm_reps {
        let start = Instant::now();
        let again = symbolizer.symbolize(&source, Input::VirtOffset(addrs))?;
        warm.push(start.elapsed().as_secs_f64());
        std::hint::black_box(again);
    }
    // blazesym lists the outermost function first and each frame with its own location; ours is innermost first.
    let answers = results
        .iter()
        .map(|r| match r {
            Symbolized::Sym(sym) => {
                let line = |ci: Option<&blazesym::symbolize::CodeInfo>| {
                    ci.and_then(|c| c.line).unwrap_or(0)
                };
                let mut frames: Answer =
                    vec![(sym.name.to_string(), line(sym.code_info.as_deref()))];
                frames.extend(
                    sym.inlined
                        .iter()
                        .map(|f| (f.name.to_string(), line(f.code_info.as_ref()))),
                );
                frames.reverse();
                frames
            }
            Symbolized::Unknown(_) => Vec::new(),
        })
        .collect();
    Ok((cold, cold_cpu, warm, answers, rss_now()?))
}

/// A `/proc/self/status` memory figure (VmHWM = peak RSS; RssAnon, RssFile = heap and mapped file now).
fn status_kb(key: &str) -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {key} in /proc/self/status"))
}

fn read_answers(path: &str) -> Result<Vec<Answer>> {
    let text = std::fs::read_to_string(path).with_context(|| path.to_owned())?;
    Ok(text
        .lines()
        .map(|l| {
            l.split('\t')
                .skip(1)
                .map(|frame| {
                    let (function, line) = frame.rsplit_once(':').unwrap_or((frame, "0"));
                    (function.to_owned(), line.parse().unwrap_or(0))
                })
                .collect()
        })
        .collect())
}

fn compare(addrs_path: &str, ours_path: &str, theirs_path: &str) -> Result<()> {
    let addrs = read_addrs(Path::new(addrs_path))?;
    let (ours, theirs) = (read_answers(ours_path)?, read_answers(theirs_path)?);
    if ours.len() != addrs.len() || theirs.len() != addrs.len() {
        bail!("answer files do not have one line per address");
    }
    let (mut depth, mut names, mut lines, mut shown) = (0usize, 0usize, 0usize, 0usize);
    for ((addr, a), b) in addrs.iter().zip(&ours).zip(&theirs) {
        let names_differ = a.len() != b.len() || a.iter().zip(b).any(|(x, y)| x.0 != y.0);
        let lines_differ = a.len() != b.len() || a.iter().zip(b).any(|(x, y)| x.1 != y.1);
        depth += usize::from(a.len() != b.len());
        names += usize::from(names_differ);
        lines += usize::from(lines_differ);
        if (names_differ || lines_differ) && shown < 10 {
            shown += 1;
            eprintln!("differs {addr:#x}\n  ours:     {a:?}\n  blazesym: {b:?}");
        }
    }
    println!(
        "compared={} frame_count_differs={depth} name_differs={names} line_differs={lines}",
        addrs.len()
    );
    Ok(())
}
