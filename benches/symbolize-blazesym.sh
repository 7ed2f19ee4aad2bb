#!/usr/bin/env bash
# symbols/ against blazesym and binutils addr2line on the same addresses, same run: cold (open + parse + symbolize
# one batch) and warm (the same batch again on the same symbolizer), addresses/s, peak RSS, ratios.
# Usage: benches/symbolize-blazesym.sh [ELF] [COUNT] [REPS]
#   ELF defaults to the cached Debian cloud vmlinux (run tests/tests/symbolize_debian_vmlinux.rs once to fetch it),
#   COUNT to 100000 addresses, REPS to 3 (each tool runs REPS times, interleaved; the table shows the median and
#   the spread). One process per tool and run, so peak RSS (VmHWM, or ru_maxrss for addr2line) is that tool's alone.
# blazesym is built only here, in its own crate outside the workspace (benches/symbolize-vs-blazesym).
# "ours" finds what blazesym finds (function, file:line, inline frames); "ours-discriminators" adds the line-table
# discriminators binutils prints, as `perf-kvm symbolize` does.
# Goals (issue #5): cold >= 2x blazesym, warm >= 3x blazesym, peak RSS <= blazesym's.
# symbols/ parses a large batch's units on every CPU the process may use (blazesym on one): the cold rows also show
# CPU seconds over all threads, and their ratio, so the gain that is not parallelism is visible too. The ratios need
# an otherwise idle machine: on a busy one, ours gets fewer CPUs than it has threads. SYMBOLS_THREADS=1 in the
# environment runs ours on one thread, as blazesym runs.
set -euo pipefail
cd "$(dirname "$0")/.."
elf="${1:-}"
count="${2:-100000}"
reps="${3:-3}"
source benches/symbolize-addresses.sh
[ -n "$elf" ] || elf="$(cached_debian_vmlinux)"
[ -n "$elf" ] && [ -f "$elf" ] || { echo "usage: $0 [ELF] [COUNT] [REPS] (no cached Debian vmlinux found)" >&2; exit 2; }

target_dir="${CARGO_TARGET_DIR:-$PWD/benches/symbolize-vs-blazesym/target}"
CARGO_TARGET_DIR="$target_dir" cargo build --release --manifest-path benches/symbolize-vs-blazesym/Cargo.toml >&2
bench="$target_dir/release/symbolize-vs-blazesym"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

pick_addresses "$elf" "$work/addrs" "$count"
cat "$elf" > /dev/null # page cache: every tool starts from the same warm file

for rep in $(seq "$reps"); do
    answers=()
    [ "$rep" = 1 ] && answers=(--answers "$work/answers-ours")
    "$bench" run ours "$elf" "$work/addrs" "${answers[@]}" >> "$work/ours"
    [ "$rep" = 1 ] && answers=(--answers "$work/answers-blazesym")
    "$bench" run blazesym "$elf" "$work/addrs" "${answers[@]}" >> "$work/blazesym"
    # What perf-kvm symbolize does for binutils-style output: discriminators too (blazesym has none).
    "$bench" run ours-discriminators "$elf" "$work/addrs" >> "$work/ours-discriminators"
    if [ -z "${SKIP_BINUTILS:-}" ]; then
        /usr/bin/time -f "cold_s=%e hwm_kb=%M" -o "$work/time" addr2line -a -f -i -p -e "$elf" < "$work/addrs" > /dev/null
        cat "$work/time" >> "$work/addr2line"
    fi
done

echo "ELF: $elf; $count addresses; $reps runs per tool (median [min-max])"
# Known difference (Debian 6.1.0-57, 100k addresses): at 0xffffffff81a032f0 (pci_acpi_root_prepare_resources.cold)
# blazesym omits the inline frame resource_list_destroy_entry that binutils, llvm-symbolizer and ours report.
"$bench" compare "$work/addrs" "$work/answers-ours" "$work/answers-blazesym" 2> "$work/differences"
head -40 "$work/differences" >&2
python3 - "$work" "$count" <<'PY'
import os, statistics, sys
work, count = sys.argv[1], int(sys.argv[2])
def runs(tool):
    path = f"{work}/{tool}"
    if not os.path.exists(path):
        return []
    return [dict(kv.split("=") for kv in line.split()) for line in open(path)]
def stat(rows, key):
    values = [float(r[key]) for r in rows if key in r]
    return (statistics.median(values), min(values), max(values)) if values else None
tools = {t: runs(t) for t in ("ours", "ours-discriminators", "blazesym", "addr2line")}
ours = {k: stat(tools["ours"], k) for k in ("cold_s", "warm_s", "hwm_kb")}
print(f"nproc {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
print(f"{'tool':<19} {'phase':<5} {'seconds':>22} {'addresses/s':>12} {'peak RSS MB':>18} {'time/ours':>10} {'CPU s':>6}")
for tool, rows in tools.items():
    if not rows:
        continue
    rss = stat(rows, "hwm_kb")
    for phase in ("cold_s", "warm_s"):
        s = stat(rows, phase)
        if s is None:
            continue
        rss_text = f"{rss[0] / 1024:.0f} [{rss[1] / 1024:.0f}-{rss[2] / 1024:.0f}]"
        cpu = stat(rows, "cold_cpu_s") if phase == "cold_s" else None
        cpu_text = f"{cpu[0]:6.3f}" if cpu else ""
        print(f"{tool:<19} {phase[:-2]:<5} {s[0]:8.3f} [{s[1]:.3f}-{s[2]:.3f}] {count / s[0]:12.0f} "
              f"{rss_text:>18} {s[0] / ours[phase][0]:10.2f} {cpu_text}")
# Ratios within each run (same load), then their median: what the goals are about.
pairs = list(zip(tools["ours"], tools["blazesym"]))
for phase, goal in (("cold_s", 2), ("warm_s", 3)):
    ratios = sorted(float(b[phase]) / float(o[phase]) for o, b in pairs)
    print(f"blazesym/ours {phase[:-2]}: median {statistics.median(ratios):.2f}x, runs {', '.join(f'{r:.2f}' for r in ratios)} (goal >= {goal}x)")
cpu = sorted(float(b["cold_cpu_s"]) / float(o["cold_cpu_s"]) for o, b in pairs)
print(f"blazesym/ours cold CPU seconds: median {statistics.median(cpu):.2f}x, runs {', '.join(f'{r:.2f}' for r in cpu)}")
rss = sorted(float(o["hwm_kb"]) / float(b["hwm_kb"]) for o, b in pairs)
print(f"ours/blazesym peak RSS: median {statistics.median(rss):.2f}, runs {', '.join(f'{r:.2f}' for r in rss)} (goal <= 1)")
PY
