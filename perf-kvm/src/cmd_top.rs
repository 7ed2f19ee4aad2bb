//! `perf-kvm top`.

#[derive(clap::Args)]
pub struct TopArgs {}

pub fn run(_args: TopArgs) -> anyhow::Result<i32> {
    anyhow::bail!("`top` is not implemented yet")
}
