#!/usr/bin/env bash
# Sampling overhead, in one run: the test guest's ring-3 throughput (user_counter per second of user_hot_a) with no
# sampling, with bare kicks (forced exits, nothing read) and with full sampling (-g: sync regs + frame walk + queue)
# at 1 kHz and 10 kHz. Goal: full sampling costs <= 1.05x the bare-kick cost (the sampler adds ~nothing beyond the
# exit itself). Usage: benches/sampling.sh [SECS] (default 4). Release build.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-4}
cargo build --release -p vmm -p perf-kvm >&2
guest=$(scripts/build-guest)
work="work=user_hot_a:100 secs=$secs hz=100"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

rate() { # prints user_counter / secs from the guest's output on stdin
    awk -v s="$secs" '/^guest-counters:/ { for (i = 1; i <= NF; i++) if ($i ~ /^user_counter=/) { split($i, a, "="); printf "%.0f\n", a[2] / s } }'
}
run_plain() { target/release/vmm run --kernel "$guest" --cmdline "$work" | rate; }
run_rec() { target/release/perf-kvm record "$@" -o "$tmp/p.data" -- run --kernel "$guest" --cmdline "$work" 2>/dev/null | rate; }

base=$(run_plain)
printf '%-28s %12s iter/s   %s\n' "no sampling" "$base" "1.000x"
for hz in 1000 10000; do
    kick=$(run_rec -F "$hz" --kick-only)
    full=$(run_rec -F "$hz" -g)
    kick_cost=$(awk -v b="$base" -v k="$kick" 'BEGIN { printf "%.3f", b / k }')
    full_cost=$(awk -v b="$base" -v f="$full" 'BEGIN { printf "%.3f", b / f }')
    ratio=$(awk -v k="$kick" -v f="$full" 'BEGIN { printf "%.3f", k / f }')
    printf '%-28s %12s iter/s   %sx slower\n' "bare kicks ${hz} Hz" "$kick" "$kick_cost"
    printf '%-28s %12s iter/s   %sx slower (full / bare-kick cost: %sx)\n' "full sampling -g ${hz} Hz" "$full" "$full_cost" "$ratio"
done
