#!/usr/bin/env bash
# `perf-kvm report` against `perf kvm --guest report` on the same synthetic 1M-sample guest perf.data, same run.
# Goal: <= 0.5x perf's time. Usage: benches/report.sh [SAMPLES] (default 1000000). Release build.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000000}
cargo build --release -p perf-kvm --bins --examples >&2
guest=$(scripts/build-guest)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
target/release/examples/synth_perf_data "$guest" "$tmp/p.data" "$n"
cp "$guest" "$tmp/vmlinux"   # perf 6.1 double-frees when --guestvmlinux is also a guest user map's path
t() { local s e; s=$(date +%s.%N); "$@" > /dev/null 2>&1; e=$(date +%s.%N); awk -v s="$s" -v e="$e" 'BEGIN { printf "%.2f", e - s }'; }
ours=$(t target/release/perf-kvm report -i "$tmp/p.data" --stdio --no-children)
theirs=$(t perf kvm --guest --guestvmlinux="$tmp/vmlinux" report -i "$tmp/p.data" --stdio --no-children)
echo "samples: $n   perf-kvm report: ${ours}s   perf kvm --guest report: ${theirs}s   ratio: $(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.2f", a / b }')x"
