#!/usr/bin/env bash
# gdb stub speed against QEMU's, in one run, same test guest ELF, same gdb: `stepi` per second in ring 0 (each step
# as gdb runs it, stop reply and frame included) and `dump binary memory` MB/s from the guest's direct map.
# Goals (issue #4): steps >= 2x QEMU's, memory >= 4x. Also the CPU time per step of gdb and of the stub's process
# (VMM or QEMU, all threads, from /proc/PID/task/*/schedstat): gdb and the stub take turns, so the two add up to
# the wall time per step on a host that has a core for each, and they move less than steps/s with the host's load.
# Rounds alternate between the two (a fresh VM each, one at a time; medians reported), so that a busy host
# slows both alike. Usage: benches/gdb.sh [STEPS] [MIB] [ROUNDS] (defaults 300 steps, 32 MiB, 5 rounds).
# Release build of vmm.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-300}
mib=${2:-32}
rounds=${3:-5}
cargo build --release -p vmm >&2
vmm="${CARGO_TARGET_DIR:-target}/release/vmm"
guest=$(scripts/build-guest)
qemu_cpu=$(scripts/qemu-kvm-cpu)  # the first -cpu model this host's KVM accepts (host where it can)
# kernel_spin keeps the vCPU in ring 0 (emulated on PVM hosts); long enough to outlive the measurement.
cmdline="work=kernel_spin:100 secs=300"
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# Runs in gdb: stop in kernel_spin (paging on, ring 0), time STEPS stepi, then dump MIB MiB of the direct map
# (guest physical 16 MiB up, 0xffff800000000000 + phys), print "RESULT steps/s MB/s gdb-us stub-us" (CPU time per
# step) and end the VM.
cat > "$work/measure.py" <<PY
import glob
import os
import time
import gdb
def cpu_ns(pid):
    total = 0
    for stat in glob.glob("/proc/%s/task/*/schedstat" % pid):
        try:
            total += int(open(stat).read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended meanwhile
    return total
stub = os.environ["STUB_PID"]
gdb.execute("set language c")
gdb.execute("hbreak kernel_spin")
gdb.execute("continue", to_string=True)
gdb.execute("delete")
start = time.perf_counter()
gdb_cpu, stub_cpu = cpu_ns("self"), cpu_ns(stub)
for _ in range($steps):
    gdb.execute("stepi", to_string=True)
step_rate = $steps / (time.perf_counter() - start)
gdb_us = (cpu_ns("self") - gdb_cpu) / $steps / 1e3
stub_us = (cpu_ns(stub) - stub_cpu) / $steps / 1e3
first = 0xffff800001000000
size = $mib << 20
start = time.perf_counter()
gdb.execute("dump binary memory $work/dump.bin %#x %#x" % (first, first + size))
mb_rate = size / (time.perf_counter() - start) / 1e6
print("RESULT %.0f %.2f %.0f %.0f" % (step_rate, mb_rate, gdb_us, stub_us))
gdb.execute("kill")
PY

measure() { # gdb address → "steps/s MB/s gdb-us stub-us"
    STUB_PID=${pids[-1]} gdb -batch -nx -ex 'set confirm off' -ex "file $guest" -ex "target remote $1" \
        -x "$work/measure.py" 2>&1 |
        tee "$work/gdb.log" | awk '/^RESULT / { print $2, $3, $4, $5 }' | grep . ||
        { echo "gdb.sh: no result from $1:" >&2; cat "$work/gdb.log" "$work/vmm.err" "$work/qemu.err" >&2; exit 1; }
}

start_ours() { # → gdb address; the VMM prints the port it bound
    "$vmm" run --kernel "$guest" --cmdline "$cmdline" --gdb 127.0.0.1:0 --gdb-wait >/dev/null 2>"$work/vmm.err" &
    pids+=($!)
    for _ in $(seq 100); do grep -q 'gdb server listening on' "$work/vmm.err" && break; sleep 0.1; done
    sed -n 's/.*gdb server listening on \([^ ]*\).*/\1/p' "$work/vmm.err" | head -1
}

start_qemu() { # → gdb address
    local port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    qemu-system-x86_64 -enable-kvm -M microvm -cpu "$qemu_cpu" -m 256 -smp 1 -nodefaults -no-user-config -display none \
        -serial null -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04 -kernel "$guest" \
        -append "$cmdline" -gdb "tcp:127.0.0.1:$port" -S 2>"$work/qemu.err" &
    pids+=($!)
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    echo "127.0.0.1:$port"
}

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
row() { printf '%-10s %12s %12s %12s %12s\n' "$@"; }
row "" "stepi/s" "dump MB/s" "gdb us/step" "stub us/step"
for round in $(seq "$rounds"); do
    for peer in ours qemu; do
        # Not in a subshell: start_* record the pid for the cleanup (and measure reads it).
        "start_$peer" >"$work/address"
        read -r steps mb gdb_us stub_us < <(measure "$(cat "$work/address")")
        [ -n "$steps" ] || { echo "gdb.sh: no measurement from $peer" >&2; exit 1; }
        wait "${pids[-1]}" 2>/dev/null || true
        row "$peer #$round" "$steps" "$mb" "$gdb_us" "$stub_us"
        echo "$steps $mb $gdb_us $stub_us" >>"$work/$peer"
    done
done
column_median() { cut -d' ' -f"$2" "$work/$1" | median; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
row "ours" "$(column_median ours 1)" "$(column_median ours 2)" "$(column_median ours 3)" "$(column_median ours 4)"
row "qemu" "$(column_median qemu 1)" "$(column_median qemu 2)" "$(column_median qemu 3)" "$(column_median qemu 4)"
row "ours/qemu" "$(ratio "$(column_median ours 1)" "$(column_median qemu 1)")" \
    "$(ratio "$(column_median ours 2)" "$(column_median qemu 2)")" \
    "$(ratio "$(column_median ours 3)" "$(column_median qemu 3)")" \
    "$(ratio "$(column_median ours 4)" "$(column_median qemu 4)")"
echo "(medians; goals: stepi/s >= 2x, dump >= 4x)"
