#!/usr/bin/env bash
# Throughput of `perf-kvm symbolize` against binutils addr2line and llvm-symbolizer, same addresses, same run.
# Usage: benches/symbolize.sh [ELF] [COUNTS...]
#   ELF defaults to the cached Debian cloud vmlinux (see tests/tests/symbolize_debian_vmlinux.rs; run that test once
#   to download it). COUNTS default to "2000 50000": a small batch shows start-up cost, a large one steady state.
# Prints seconds and addresses/s per tool, and each peer's time divided by ours (>1 = we are faster).
set -euo pipefail
cd "$(dirname "$0")/.."
elf="${1:-}"
shift || true
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(2000 50000)
if [ -z "$elf" ]; then
    for dir in "${KVM_PROF_CACHE:-}" "${XDG_CACHE_HOME:+$XDG_CACHE_HOME/kvm-prof}" /var/cache/kvm-prof "$HOME/.cache/kvm-prof"; do
        [ -n "$dir" ] || continue
        found="$(ls "$dir"/vmlinux-6.1.0-*-cloud-amd64 2>/dev/null | sort -V | tail -1 || true)"
        if [ -n "$found" ]; then elf="$found"; break; fi
    done
fi
[ -n "$elf" ] && [ -f "$elf" ] || { echo "usage: $0 ELF [COUNTS...] (no cached Debian vmlinux found)" >&2; exit 2; }

cargo build --release -p perf-kvm >&2
target_dir="${CARGO_TARGET_DIR:-target}"
perf_kvm="$target_dir/release/perf-kvm"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Deterministic addresses inside sized functions, as the tests choose them.
readelf -sW "$elf" | awk '$4 == "FUNC" && $3 > 0 && $7 != "UND" { print $2, $3 }' | sort -u > "$work/functions"
python3 - "$work/functions" "$work" "${counts[@]}" <<'PY'
import sys
functions = [(int(a, 16), int(s)) for a, s in (l.split() for l in open(sys.argv[1]))]
def mix(x):
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)
for count in map(int, sys.argv[3:]):
    with open(f"{sys.argv[2]}/addrs-{count}", "w") as out:
        for i in range(count):
            start, size = functions[i * len(functions) // count % len(functions)]
            out.write(f"{start + mix(i) % size:#x}\n")
PY

seconds() {
    local start end
    start=$(date +%s.%N)
    "$@" > /dev/null
    end=$(date +%s.%N)
    echo "$end - $start" | bc -l
}

echo "ELF: $elf"
printf '%-8s %-16s %10s %14s %12s\n' count tool seconds addresses/s "peer/ours"
for count in "${counts[@]}"; do
    addrs="$work/addrs-$count"
    ours=$(seconds sh -c "\"$perf_kvm\" symbolize --guest-vmlinux \"$elf\" < \"$addrs\"")
    binutils=$(seconds sh -c "addr2line -a -f -i -p -e \"$elf\" < \"$addrs\"")
    llvm=$(seconds sh -c "llvm-symbolizer --output-style=GNU -a -f -i -p -e \"$elf\" < \"$addrs\"")
    for row in "perf-kvm $ours" "addr2line $binutils" "llvm-symbolizer $llvm"; do
        set -- $row
        printf '%-8s %-16s %10.3f %14.0f %12.2f\n' "$count" "$1" "$2" "$(echo "$count / $2" | bc -l)" \
            "$(echo "$2 / $ours" | bc -l)"
    done
done
