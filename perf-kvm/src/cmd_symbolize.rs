//! `perf-kvm symbolize`.

#[derive(clap::Args)]
pub struct SymbolizeArgs {}

pub fn run(_args: SymbolizeArgs) -> anyhow::Result<i32> {
    anyhow::bail!("`symbolize` is not implemented yet")
}
