#!/usr/bin/env python3
"""Boot benchmark: our `vmm run` against `qemu-system-x86_64 -enable-kvm -M microvm` booting the same test-guest ELF,
in the same run. Reports time from process start to the first serial byte and to exit (min and median of N runs),
their ratios, and peak RSS. Usage: benches/boot.py [RUNS] (default 10). Needs scripts/build-guest and a release build.
"""
import os, statistics, subprocess, sys, time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
guest = subprocess.check_output([os.path.join(root, "scripts/build-guest")], text=True).strip()
vmm = os.path.join(root, "target/release/vmm")
if not os.path.exists(vmm):
    subprocess.check_call(["cargo", "build", "--release", "-p", "vmm"], cwd=root)
cmdline = "secs=0 hz=0"
peers = {
    "vmm": [vmm, "run", "--kernel", guest, "--mem", "256", "--cmdline", cmdline],
    "qemu-microvm": ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-m", "256", "-kernel", guest,
                     "-append", cmdline, "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
                     "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
}

def one(cmd):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    first = p.stdout.read(1)
    t1 = time.perf_counter()
    p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    t2 = time.perf_counter()
    p.returncode = status
    if not first:
        sys.exit(f"{cmd[0]} printed nothing")
    return t1 - t0, t2 - t0, usage.ru_maxrss

results = {name: [] for name in peers}
for _ in range(runs):
    for name, cmd in peers.items():  # interleaved, so load changes hit both alike
        results[name].append(one(cmd))

def fmt(xs):
    return f"min {min(xs) * 1e3:7.1f} ms  median {statistics.median(xs) * 1e3:7.1f} ms"

summary = {}
for name, rs in results.items():
    first, total = [r[0] for r in rs], [r[1] for r in rs]
    summary[name] = (min(first), min(total))
    rss = max(r[2] for r in rs)
    print(f"{name:13s} first serial byte: {fmt(first)}   exit: {fmt(total)}   peak RSS (max over runs) {rss / 1024:.1f} MiB")
v, q = summary["vmm"], summary["qemu-microvm"]
print(f"ratio vmm/qemu (min): first serial byte {v[0] / q[0]:.3f}x, exit {v[1] / q[1]:.3f}x")
