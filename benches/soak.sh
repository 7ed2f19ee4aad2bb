#!/usr/bin/env bash
# Soak (issue #8, not in CI): one VMM whose guest runs DURATION seconds, sampled at the host's maximum rate
# (MAX_FREQUENCY_HZ in vmm/src/sampler.rs) with -g by `perf-kvm record --vm` until the guest ends, while gdb is
# attached and loops (all but the last 8 s): break in kernel_leaf, stepi x20, let the guest run ~20 timer ticks. Every INTERVAL seconds it samples the RSS of the vmm and perf-kvm processes. At the end it
# prints RSS start/end/max and slope per process, and the sample accounting: written (record's count, re-counted by
# perf-kvm report), record's lost and the sampler's own counters (queue full, ticks skipped, idle ticks), and what
# the vCPU threads' CPU time owed (samples follow CPU time: owed = CPU seconds x rate). Fails when RSS grows by more
# than RSS_MAX_GROWTH_KIB after the warm-up or when more than UNACCOUNTED_MAX_PCT % of the owed samples are neither
# written nor counted lost.
#
# Usage: benches/soak.sh [DURATION_SECS] (default 600; e.g. 60 for a smoke run). Release build.
# Knobs (environment): INTERVAL (RSS every N s, 5), RSS_MAX_GROWTH_KIB (8192), UNACCOUNTED_MAX_PCT (2),
# FREQ (Hz instead of the maximum), GDB=0 (no gdb, to tell its share apart), WORK (the guest's work= mix).
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-600}
interval=${INTERVAL:-5}
rss_max_growth_kib=${RSS_MAX_GROWTH_KIB:-8192}
unaccounted_max_pct=${UNACCOUNTED_MAX_PCT:-2}
profile=${SOAK_PROFILE:-release} # `dev` for a quick check of the script itself
cargo build --profile "$profile" -p vmm -p perf-kvm >&2
bin=${CARGO_TARGET_DIR:-target}/$([ "$profile" = dev ] && echo debug || echo "$profile")
guest=$(scripts/build-guest)
hz=$(sed -n 's/^pub const MAX_FREQUENCY_HZ: u32 = \([0-9_]*\);/\1/p' vmm/src/sampler.rs | tr -d _)
[ -n "$hz" ] || { echo "soak: MAX_FREQUENCY_HZ not found in vmm/src/sampler.rs" >&2; exit 2; }
hz=${FREQ:-$hz}
tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

# The recording ends with the guest, so that every sample the VMM took reaches the file.
"$bin"/vmm run --kernel "$guest" --cpus 1 \
    --cmdline "work=${WORK:-user_hot_a:50,kernel_spin:50} secs=$duration hz=100" \
    --control "$tmp/vm.sock" --gdb "$tmp/gdb.sock" >"$tmp/vmm.out" 2>"$tmp/vmm.err" &
vmm_pid=$!
pids+=("$vmm_pid")
for _ in $(seq 300); do [ -S "$tmp/vm.sock" ] && [ -S "$tmp/gdb.sock" ] && break; sleep 0.1; done
[ -S "$tmp/vm.sock" ] || { echo "soak: no control socket" >&2; cat "$tmp/vmm.err" >&2; exit 1; }

cat >"$tmp/loop.py" <<EOF
import gdb, time
gdb.execute("set pagination off")
gdb.execute("set confirm off")
gdb.execute("target remote $tmp/gdb.sock")
# Leave the guest alone for its last seconds, so that it ends by itself.
end = time.time() + max($duration - 8, 1)
rounds = steps = 0
try:
    while time.time() < end:
        bp = gdb.Breakpoint("kernel_leaf")
        gdb.execute("continue", to_string=True)
        bp.delete()
        for _ in range(20):
            gdb.execute("stepi", to_string=True)
            steps += 1
        tick = gdb.Breakpoint("timer_interrupt")
        tick.ignore_count = 20
        gdb.execute("continue", to_string=True)
        tick.delete()
        rounds += 1
    gdb.execute("detach")
    print(f"soak-gdb: {rounds} rounds, {steps} steps")
except gdb.error as e:
    print(f"soak-gdb: {rounds} rounds, {steps} steps, then: {e}")
EOF

vcpu_cpu_ns() { # summed CPU time of the VMM's vCPU threads (what the sampler's CPU-time credit follows)
    local sum=0 t
    for t in /proc/"$vmm_pid"/task/*; do
        [ "$(cat "$t/comm" 2>/dev/null)" = vcpu0 ] || continue
        sum=$((sum + $(cut -d' ' -f1 "$t/schedstat")))
    done
    echo "$sum"
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

"$bin"/perf-kvm record --vm "$tmp/vm.sock" -F "$hz" -g -o "$tmp/soak.data" >/dev/null 2>"$tmp/record.err" &
rec_pid=$!
pids+=("$rec_pid")
# The session starts with the VMM's sampler thread; CPU time before it owes nothing.
for _ in $(seq 600); do grep -qx sampler /proc/"$vmm_pid"/task/*/comm 2>/dev/null && break; sleep 0.05; done
cpu_start=$(vcpu_cpu_ns)
if [ "${GDB:-1}" = 1 ]; then
    gdb -nx -batch -x "$tmp/loop.py" "$guest" >"$tmp/gdb.out" 2>&1 &
else
    sleep "$duration" &
fi
gdb_pid=$!
pids+=("$gdb_pid")

start=$(date +%s)
last_rss=-1000
cpu_last=$cpu_start
: >"$tmp/rss"
while kill -0 "$rec_pid" 2>/dev/null; do
    now=$(date +%s)
    if [ $((now - last_rss)) -ge "$interval" ]; then
        echo "$((now - start)) $(rss_kib "$vmm_pid") $(rss_kib "$rec_pid")" >>"$tmp/rss"
        last_rss=$now
    fi
    # The vCPU thread is gone once the guest ended: keep its last reading (at most 0.2 s old).
    c=$(vcpu_cpu_ns)
    [ "$c" -gt 0 ] && cpu_last=$c
    sleep 0.2
done
rec_status=0
wait "$rec_pid" || rec_status=$?
wait "$gdb_pid" || true
wait "$vmm_pid" || true

summary=$(tr '\r' '\n' <"$tmp/record.err" | grep 'Captured and wrote' || true)
[ "$rec_status" = 0 ] && [ -n "$summary" ] || { echo "soak: record failed ($rec_status)" >&2; cat "$tmp/record.err" >&2; exit 1; }
written=$(sed -n 's/.*(\([0-9]*\) samples, \([0-9]*\) lost).*/\1/p' <<<"$summary")
lost=$(sed -n 's/.*(\([0-9]*\) samples, \([0-9]*\) lost).*/\2/p' <<<"$summary")
sampler=$(tr '\r' '\n' <"$tmp/record.err" | grep 'sampler:' || true)
queue_full=$(sed -n 's/.*sampler: \([0-9]*\) queue full, \([0-9]*\) ticks skipped, \([0-9]*\) idle ticks.*/\1/p' <<<"$sampler")
skipped=$(sed -n 's/.*sampler: \([0-9]*\) queue full, \([0-9]*\) ticks skipped, \([0-9]*\) idle ticks.*/\2/p' <<<"$sampler")
idle=$(sed -n 's/.*sampler: \([0-9]*\) queue full, \([0-9]*\) ticks skipped, \([0-9]*\) idle ticks.*/\3/p' <<<"$sampler")
reported=$("$bin"/perf-kvm report --stdio -i "$tmp/soak.data" 2>/dev/null | sed -n 's/^# Samples: \([0-9]*\).*/\1/p')

echo "soak: ${duration}s at ${hz} Hz -g, gdb stepping: $(grep soak-gdb "$tmp/gdb.out" || echo 'gdb loop: no summary')"
python3 - "$tmp/rss" "$written" "$lost" "${reported:-0}" "$cpu_start" "$cpu_last" "$hz" \
    "$rss_max_growth_kib" "$unaccounted_max_pct" "$queue_full" "$skipped" "$idle" <<'EOF'
import sys
rows = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
written, lost, reported, cpu0, cpu1, hz, max_growth, max_pct, queue_full, skipped, idle = map(int, sys.argv[2:13])
ok = True
# The first fifth is warm-up: guest pages touched, queues and buffers filled.
warm = rows[len(rows) // 5:] if len(rows) >= 5 else rows
for col, name in ((1, "vmm"), (2, "perf-kvm record")):
    ts = [r[0] for r in warm]
    vs = [r[col] for r in warm]
    n = len(ts)
    mt, mv = sum(ts) / n, sum(vs) / n
    den = sum((t - mt) ** 2 for t in ts) or 1
    slope = sum((t - mt) * (v - mv) for t, v in zip(ts, vs)) / den * 60
    growth = max(vs) - vs[0]
    print(f"  RSS {name:16} start {rows[0][col]:8} KiB  after warm-up {vs[0]:8} KiB  end {vs[-1]:8} KiB  "
          f"max {max(r[col] for r in rows):8} KiB  slope {slope:+9.1f} KiB/min  ({n} points)")
    if growth > max_growth:
        print(f"  FAIL: {name} RSS grew {growth} KiB after warm-up (limit {max_growth})")
        ok = False
# Samples follow CPU time: a vCPU owes one per period of its thread's CPU time. An owed sample is written, dropped
# on a full queue, or (ticks skipped) beyond the MAX_SAMPLES_PER_KICK burst one kick may take.
owed = (cpu1 - cpu0) * hz // 1_000_000_000
unaccounted = owed - written - lost
pct = 100 * unaccounted / owed if owed else 0
print(f"  samples written {written} (report reads {reported}); record's lost {lost} = sampler's queue full "
      f"{queue_full} + ticks skipped {skipped}; idle ticks {idle}")
print(f"  owed by vCPU CPU time {owed} ({(cpu1 - cpu0) / 1e9:.1f} CPU s x {hz} Hz)")
print(f"  unaccounted (owed - written - lost) {unaccounted} ({pct:+.2f} % of owed)")
if lost != queue_full + skipped:
    print("  FAIL: record's lost count is not the sampler's queue full + ticks skipped")
    ok = False
if reported != written:
    print("  FAIL: the report does not read what record says it wrote")
    ok = False
if abs(pct) > max_pct:
    print(f"  FAIL: more than {max_pct} % of the owed samples are unaccounted")
    ok = False
sys.exit(0 if ok else 1)
EOF
