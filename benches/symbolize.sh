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
source benches/symbolize-addresses.sh
[ -n "$elf" ] || elf="$(cached_debian_vmlinux)"
[ -n "$elf" ] && [ -f "$elf" ] || { echo "usage: $0 ELF [COUNTS...] (no cached Debian vmlinux found)" >&2; exit 2; }

cargo build --release -p perf-kvm >&2
target_dir="${CARGO_TARGET_DIR:-target}"
perf_kvm="$target_dir/release/perf-kvm"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

for count in "${counts[@]}"; do
    pick_addresses "$elf" "$work/addrs-$count" "$count"
done

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
