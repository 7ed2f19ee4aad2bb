# Sourced by benches/symbolize.sh and benches/symbolize-blazesym.sh: the Debian vmlinux they default to and the
# deterministic addresses they feed every tool, so that the two benchmarks measure the same inputs.

# Prints the newest cached Debian cloud vmlinux (tests/tests/symbolize_debian_vmlinux.rs fetches it), or nothing.
cached_debian_vmlinux() {
    local dir found
    for dir in "${KVM_PROF_CACHE:-}" "${XDG_CACHE_HOME:+$XDG_CACHE_HOME/kvm-prof}" "$HOME/.cache/kvm-prof"; do
        [ -n "$dir" ] || continue
        found="$(ls "$dir"/vmlinux-6.1.0-*-cloud-amd64 2>/dev/null | sort -V | tail -1 || true)"
        if [ -n "$found" ]; then echo "$found"; return; fi
    done
}

# pick_addresses ELF OUT COUNT: COUNT addresses inside sized FUNC symbols of ELF, spread over all functions, one
# per line into OUT, the same on every run (as the tests choose them).
pick_addresses() {
    readelf -sW "$1" | awk '$4 == "FUNC" && $3 > 0 && $7 != "UND" { print $2, $3 }' | sort -u |
        python3 -c '
import sys
functions = [(int(a, 16), int(s)) for a, s in (l.split() for l in sys.stdin)]
def mix(x):
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)
count = int(sys.argv[2])
with open(sys.argv[1], "w") as out:
    for i in range(count):
        start, size = functions[i * len(functions) // count % len(functions)]
        out.write(f"{start + mix(i) % size:#x}\n")
' "$2" "$3"
}
