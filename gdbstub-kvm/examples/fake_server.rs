//! Serves a `FakeTarget` to gdb, for trying the stub by hand:
//! `cargo run -p gdbstub-kvm --example fake_server -- 127.0.0.1:1234 2` then `gdb -ex 'target remote :1234'`.

use anyhow::Context;
use gdbstub_kvm::testing::FakeTarget;
use gdbstub_kvm::{GdbAddress, GdbListener};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let address: GdbAddress = args.next().as_deref().unwrap_or("127.0.0.1:1234").parse()?;
    let vcpus: usize = args
        .next()
        .as_deref()
        .unwrap_or("2")
        .parse()
        .context("vCPU count")?;
    let mut target = FakeTarget::new(vcpus)?;
    let listener = GdbListener::bind(&address)?;
    // The test harness reads this line to learn the port.
    println!("listening on {}", listener.local_address()?);
    loop {
        let connection = listener.accept()?;
        let end = gdbstub_kvm::serve(connection, &mut target)?;
        eprintln!("session ended: {end:?}");
    }
}
