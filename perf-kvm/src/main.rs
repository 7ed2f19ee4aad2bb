//! `perf-kvm`: a perf-style tool for KVM guests.

mod cmd_record;
mod cmd_report;
mod cmd_stat;
mod cmd_symbolize;
mod cmd_top;
mod vm_source;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "perf-kvm",
    version,
    about = "Profile and symbolize KVM guests, perf-style"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample guest RIPs (and callchains with -g) into perf.data.
    Record(cmd_record::RecordArgs),
    /// Read perf.data and print the profile.
    Report(cmd_report::ReportArgs),
    /// VM exit statistics.
    Stat(cmd_stat::StatArgs),
    /// Live view of the hottest guest symbols.
    Top(cmd_top::TopArgs),
    /// Symbolize guest addresses (output as `addr2line -a -f -i -p`).
    Symbolize(cmd_symbolize::SymbolizeArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Record(args) => cmd_record::run(args),
        Command::Report(args) => cmd_report::run(args),
        Command::Stat(args) => cmd_stat::run(args),
        Command::Top(args) => cmd_top::run(args),
        Command::Symbolize(args) => cmd_symbolize::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("perf-kvm: {err:#}");
            std::process::exit(1);
        }
    }
}
