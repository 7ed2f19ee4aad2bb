//! `perf-kvm report`: reads perf.data and prints the profile.
