fn main() {
    eprintln!("vmm: not implemented yet");
    std::process::exit(2);
}
