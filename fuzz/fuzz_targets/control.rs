//! The control socket on arbitrary lines: the VMM's request parser and dispatcher (against a fake VM that answers
//! like a real one), and the client's parsers of replies and sample-stream lines (perf-kvm reads those from a VMM).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::control::{handle_line, parse_reply, parse_stream_event, ControlTarget};
use vmm::exit_stats::VcpuExitStats;
use vmm::vcpu::VcpuError;
use vmm::{GuestRegisters, VmInfo};

struct FakeVm {
    info: VmInfo,
}

impl ControlTarget for FakeVm {
    fn info(&self) -> &VmInfo {
        &self.info
    }
    fn vcpu_count(&self) -> usize {
        self.info.vcpus
    }
    fn pause_all(&self) -> Result<(), VcpuError> {
        Ok(())
    }
    fn resume_all(&self) -> Result<(), VcpuError> {
        Err(VcpuError::Exited(1))
    }
    fn registers(&self, vcpu: usize) -> Result<GuestRegisters, VcpuError> {
        assert!(vcpu < self.info.vcpus, "the dispatcher passed vCPU {vcpu}");
        Ok(GuestRegisters::default())
    }
    fn read_msr(&self, vcpu: usize, index: u32) -> Result<Option<u64>, VcpuError> {
        assert!(vcpu < self.info.vcpus, "the dispatcher passed vCPU {vcpu}");
        Ok((index % 2 == 0).then_some(u64::from(index)))
    }
    fn exit_stats(&self, _reset: bool) -> Vec<VcpuExitStats> {
        vec![VcpuExitStats::default(); self.info.vcpus]
    }
}

fuzz_target!(|data: &[u8]| {
    let vm = FakeVm {
        info: VmInfo {
            vcpus: 2,
            mem_mib: 64,
            kernel: "guest.elf".into(),
            kernel_format: "ELF".into(),
            cmdline: String::new(),
            pid: 1,
            vcpu_tids: vec![100, 101],
        },
    };
    let text = String::from_utf8_lossy(data);
    for line in text.split('\n') {
        let reply = handle_line(line, &vm);
        assert!(reply["ok"].is_boolean(), "reply without ok: {reply}");
        let _ = parse_reply(line);
        let _ = parse_stream_event(line);
    }
});
