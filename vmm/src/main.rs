//! `vmm`: boot a guest kernel under KVM (`vmm run`), or report what this host's KVM can do (`vmm probe`).

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kvm_ioctls::Kvm;
use vmm::{HostCaps, Vm, VmEnd};

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A KVM VMM for guest profiling and debugging"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel (ELF with a PVH note, ELF vmlinux, or bzImage) and run it until it ends.
    Run(vmm::cli::RunArgs),
    /// Print this host's KVM capabilities and the emulator limits the VMM works around.
    Probe,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Probe => probe(),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(err) => {
            eprintln!("vmm: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn probe() -> anyhow::Result<i32> {
    let kvm = vmm::open_kvm()?;
    let caps = HostCaps::probe(&kvm)?;
    println!("{caps}");
    Ok(0)
}

fn run(args: vmm::cli::RunArgs) -> anyhow::Result<i32> {
    let kvm: Kvm = vmm::open_kvm()?;
    let caps = HostCaps::probe_cached(&kvm)?;
    let mut cfg = args.vm_config(Box::new(std::io::stdout()))?;
    // The vCPUs wait until the gdb and control sockets are bound: a bad address or path is one error line and
    // the guest never runs an instruction.
    let hold = args.gdb.is_some() || args.control.is_some();
    cfg.start_paused = args.gdb_wait || hold;
    let (vm, _) = Vm::start(&kvm, &caps, cfg)?;
    let gdb = match &args.gdb {
        Some(address) => {
            let target = vmm::debug::VmDebugTarget::new(vm.control(), caps.clone());
            let server = vmm::debug::GdbServer::start(address, target)?;
            eprintln!(
                "vmm: gdb server listening on {}{}",
                server.address(),
                if args.gdb_wait {
                    " (vCPUs wait for gdb)"
                } else {
                    ""
                }
            );
            Some(server)
        }
        None => None,
    };
    let _control = match &args.control {
        Some(path) => Some(vmm::control::serve(path, vm.control()).context("control socket")?),
        None => None,
    };
    if hold && !args.gdb_wait {
        vm.control().resume_all()?;
    }
    forward_stdin(vm.devices());
    let end = vm.run_to_end();
    if let Some(gdb) = &gdb {
        gdb.report_end(&end);
    }
    report_end(&end);
    Ok(end.exit_code())
}

fn report_end(end: &VmEnd) {
    match end {
        VmEnd::Crash { report, .. } => eprintln!("vmm: guest crashed\n{report}"),
        VmEnd::GuestExit(status) if *status != 0 => {
            eprintln!("vmm: guest exited with status {status}")
        }
        _ => {}
    }
}

/// Host stdin goes to the guest's UART, byte by byte as it arrives (blocking reads on a thread of its own).
fn forward_stdin(devices: std::sync::Arc<vmm::devices::PioDevices>) {
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    let taken = devices.serial_input(pending);
                    pending = &pending[taken..];
                    if taken == 0 {
                        // The guest is not draining its FIFO; don't spin on it.
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            }
        });
}
