#!/usr/bin/env python3
"""Boot benchmark: our `vmm run` against `qemu-system-x86_64 -enable-kvm -M microvm` booting the same test-guest ELF,
in the same run. Reports time from process start to the first serial byte and to exit (min and median of N runs),
their ratios, once for a guest that exits right after its first lines (`boot_only=1`: what the VMMs cost) and once
for `secs=0 hz=0` (the guest also calibrates its clocks against the PIT and starts its APs, ~250 ms of guest time); and, from /proc/PID while a guest runs for a second (sampled every 20 ms), the RSS beyond guest RAM
with 1 vCPU (the sum of Rss over smaps minus the Rss of the guest-RAM mapping; peak of each run, median over runs)
and the peak RSS (VmHWM: the whole process, guest pages it touched included). Not getrusage's ru_maxrss: a child
forked from Python starts out with Python's pages and keeps that high-water mark across exec.
Usage: benches/boot.py [RUNS] (default 10). Needs scripts/build-guest and a release build (built when missing).
"""
import os, statistics, subprocess, sys, time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
guest = subprocess.check_output([os.path.join(root, "scripts/build-guest")], text=True).strip()
target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
vmm = os.path.join(target, "release/vmm")
subprocess.check_call(["cargo", "build", "--release", "-q", "-p", "vmm"], cwd=root)  # a no-op when up to date
MEM_MIB = 256


def peers(cmdline):
    return {
        "vmm": [vmm, "run", "--kernel", guest, "--mem", str(MEM_MIB), "--cmdline", cmdline],
        "qemu-microvm": ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-m", str(MEM_MIB), "-kernel", guest,
                         "-append", cmdline, "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
                         "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
    }


def one(cmd):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    first = p.stdout.read(1)
    t1 = time.perf_counter()
    p.stdout.read()
    p.wait()
    t2 = time.perf_counter()
    if not first:
        sys.exit(f"{cmd[0]} printed nothing")
    return t1 - t0, t2 - t0

def overhead_kib(pid):
    """Rss of every mapping but guest RAM (the anonymous mapping of exactly MEM_MIB), in KiB; None once it is gone."""
    try:
        text = open(f"/proc/{pid}/smaps").read()
    except OSError:
        return None
    total, guest, size = 0, None, 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Size":
            size = int(value.split()[0])
        elif key == "Rss":
            rss = int(value.split()[0])
            total += rss
            if size == MEM_MIB * 1024:
                guest = rss
    return None if guest is None else total - guest


def hwm_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def overhead(cmd):
    """(peak RSS beyond guest RAM, peak RSS) in KiB while the guest runs."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    peak, hwm = None, 0
    while p.poll() is None:
        o = overhead_kib(p.pid)
        if o is not None:
            peak = o if peak is None else max(peak, o)
        hwm = max(hwm, hwm_kib(p.pid))
        time.sleep(0.02)
    if peak is None:
        sys.exit(f"{cmd[0]}: no guest-RAM mapping of {MEM_MIB} MiB seen in /proc/PID/smaps")
    return peak, hwm


bare, boot, busy = peers("boot_only=1"), peers("secs=0 hz=0"), peers("secs=1 hz=0 work=user_hot_a:100")
results = {name: [] for name in boot}
bare_results = {name: [] for name in boot}
extra = {name: [] for name in boot}
for _ in range(runs):
    for name in boot:  # interleaved, so load changes hit both alike
        bare_results[name].append(one(bare[name]))
        results[name].append(one(boot[name]))
    for name in boot:
        extra[name].append(overhead(busy[name]))

def fmt(xs):
    return f"min {min(xs) * 1e3:7.1f} ms  median {statistics.median(xs) * 1e3:7.1f} ms"

for label, res in (("boot_only=1", bare_results), ("secs=0 hz=0", results)):
    summary = {}
    for name, rs in res.items():
        first, total = [r[0] for r in rs], [r[1] for r in rs]
        summary[name] = (min(first), min(total))
        print(f"{label:12s} {name:13s} first serial byte: {fmt(first)}   exit: {fmt(total)}")
    v, q = summary["vmm"], summary["qemu-microvm"]
    print(f"{label:12s} ratio vmm/qemu (min): first serial byte {v[0] / q[0]:.3f}x, exit {v[1] / q[1]:.3f}x")
med = {name: statistics.median(x[0] for x in xs) / 1024 for name, xs in extra.items()}
for name, xs in extra.items():
    beyond = [x[0] / 1024 for x in xs]
    print(f"{name:13s} RSS beyond guest RAM, 1 vCPU: median {med[name]:.2f} MiB (min {min(beyond):.2f}, "
          f"max {max(beyond):.2f})   peak RSS (VmHWM, max over runs) {max(x[1] for x in xs) / 1024:.1f} MiB")
print(f"ratio vmm/qemu RSS beyond guest RAM: {med['vmm'] / med['qemu-microvm']:.3f}x (goal: vmm <= 4 MiB)")
