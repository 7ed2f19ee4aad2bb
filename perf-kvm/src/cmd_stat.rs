//! `perf-kvm stat`.

#[derive(clap::Args)]
pub struct StatArgs {}

pub fn run(_args: StatArgs) -> anyhow::Result<i32> {
    anyhow::bail!("`stat` is not implemented yet")
}
