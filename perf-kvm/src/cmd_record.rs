//! `perf-kvm record`.

#[derive(clap::Args)]
pub struct RecordArgs {}

pub fn run(_args: RecordArgs) -> anyhow::Result<i32> {
    anyhow::bail!("`record` is not implemented yet")
}
