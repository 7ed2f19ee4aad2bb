//! KVM's own counters, read from the binary stats fd (`KVM_GET_STATS_FD`, Linux 5.14+) of the VM and of each vCPU.
//!
//! The fd's layout (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD"): a 24-byte header, an id string, one
//! descriptor per statistic (16 bytes plus a fixed-size name), and a data block of u64 values that KVM keeps current;
//! every read of the data block is a fresh snapshot. kvm-ioctls has no wrapper, so the ioctl and the parsing live here.
//! The counters cover what userspace exit accounting cannot see: exits KVM handles in the kernel (HLT with an
//! in-kernel irqchip, emulated instructions, MMU work).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;
const HEADER_LEN: usize = 24;
const DESC_FIXED_LEN: usize = 16;
/// Bounds on what a sane kernel reports; anything beyond is treated as a corrupt header rather than allocated.
const MAX_STATS: u32 = 4096;
const MAX_NAME_SIZE: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum KvmStatsError {
    #[error("KVM_GET_STATS_FD is not supported by this host's KVM (needs Linux 5.14 or later)")]
    Unsupported(#[source] std::io::Error),
    #[error("reading the KVM stats fd failed")]
    Read(#[source] std::io::Error),
    #[error("the KVM stats fd has an unexpected layout: {0}")]
    Layout(String),
}

/// How KVM defines a statistic's value (`KVM_STATS_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmStatKind {
    /// Only ever grows: a count of events.
    Cumulative,
    /// A current level (pages mapped, ...).
    Instant,
    /// The highest level seen.
    Peak,
    /// A histogram: the value is the sum of its buckets, i.e. the number of samples.
    Histogram,
    Unknown,
}

/// One statistic's current value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmStat {
    pub name: String,
    pub kind: KvmStatKind,
    pub value: u64,
}

/// KVM's counters of one VM: the VM-wide ones and each vCPU's, in vCPU order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmStatsSnapshot {
    pub vm: Vec<KvmStat>,
    pub vcpus: Vec<Vec<KvmStat>>,
}

impl KvmStatsSnapshot {
    /// The value of `name` on `vcpu`, if KVM has that statistic.
    pub fn vcpu_value(&self, vcpu: usize, name: &str) -> Option<u64> {
        self.vcpus
            .get(vcpu)?
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.value)
    }

    /// `name` summed over every vCPU, if KVM has that statistic.
    pub fn vcpu_total(&self, name: &str) -> Option<u64> {
        let mut found = false;
        let mut total = 0u64;
        for stats in &self.vcpus {
            if let Some(s) = stats.iter().find(|s| s.name == name) {
                found = true;
                total = total.saturating_add(s.value);
            }
        }
        found.then_some(total)
    }
}

#[derive(Debug, Clone)]
struct StatDesc {
    name: String,
    kind: KvmStatKind,
    /// Byte offset of the statistic's first u64, relative to the data block.
    offset: u32,
    /// Number of u64 values (buckets for histograms).
    size: u16,
}

/// An open stats fd of a VM or a vCPU with its descriptors parsed once.
#[derive(Debug)]
pub struct StatsFd {
    file: File,
    descs: Vec<StatDesc>,
    data_offset: u64,
    data_len: usize,
}

impl StatsFd {
    /// Opens the stats fd of a VM or vCPU fd.
    pub fn open(owner: &impl AsRawFd) -> Result<StatsFd, KvmStatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1; `owner` is a live KVM fd.
        let fd = unsafe { libc::ioctl(owner.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
        if fd < 0 {
            return Err(KvmStatsError::Unsupported(std::io::Error::last_os_error()));
        }
        // SAFETY: the ioctl just returned this fd to us and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        StatsFd::from_file(file)
    }

    fn from_file(file: File) -> Result<StatsFd, KvmStatsError> {
        let mut header = [0u8; HEADER_LEN];
        file.read_exact_at(&mut header, 0)
            .map_err(KvmStatsError::Read)?;
        let word =
            |i: usize| u32::from_le_bytes(header[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        let (name_size, num_desc, desc_offset, data_offset) = (word(1), word(2), word(4), word(5));
        if num_desc > MAX_STATS || name_size == 0 || name_size > MAX_NAME_SIZE {
            return Err(KvmStatsError::Layout(format!(
                "{num_desc} stats with names of {name_size} bytes"
            )));
        }
        let desc_len = DESC_FIXED_LEN + name_size as usize;
        let mut block = vec![0u8; desc_len * num_desc as usize];
        file.read_exact_at(&mut block, desc_offset as u64)
            .map_err(KvmStatsError::Read)?;
        let descs = parse_descriptors(&block, desc_len);
        let data_len = descs
            .iter()
            .map(|d| d.offset as usize + d.size as usize * 8)
            .max()
            .unwrap_or(0);
        Ok(StatsFd {
            file,
            descs,
            data_offset: data_offset as u64,
            data_len,
        })
    }

    /// Reads every statistic's current value.
    pub fn read(&self) -> Result<Vec<KvmStat>, KvmStatsError> {
        let mut data = vec![0u8; self.data_len];
        self.file
            .read_exact_at(&mut data, self.data_offset)
            .map_err(KvmStatsError::Read)?;
        Ok(self
            .descs
            .iter()
            .map(|d| {
                let start = d.offset as usize;
                let value = data[start..start + d.size as usize * 8]
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .fold(0u64, u64::saturating_add);
                KvmStat {
                    name: d.name.clone(),
                    kind: d.kind,
                    value,
                }
            })
            .collect())
    }
}

fn parse_descriptors(block: &[u8], desc_len: usize) -> Vec<StatDesc> {
    block
        .chunks_exact(desc_len)
        .map(|d| {
            let flags = u32::from_le_bytes(d[0..4].try_into().expect("4 bytes"));
            let size = u16::from_le_bytes(d[6..8].try_into().expect("2 bytes"));
            let offset = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes"));
            let name_bytes = &d[DESC_FIXED_LEN..];
            let end = name_bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_bytes.len());
            let kind = match flags & kvm_bindings::KVM_STATS_TYPE_MASK {
                kvm_bindings::KVM_STATS_TYPE_CUMULATIVE => KvmStatKind::Cumulative,
                kvm_bindings::KVM_STATS_TYPE_INSTANT => KvmStatKind::Instant,
                kvm_bindings::KVM_STATS_TYPE_PEAK => KvmStatKind::Peak,
                kvm_bindings::KVM_STATS_TYPE_LINEAR_HIST
                | kvm_bindings::KVM_STATS_TYPE_LOG_HIST => KvmStatKind::Histogram,
                _ => KvmStatKind::Unknown,
            };
            StatDesc {
                name: String::from_utf8_lossy(&name_bytes[..end]).into_owned(),
                kind,
                offset,
                size,
            }
        })
        .collect()
}

/// The stats fds of one VM, opened when it is built. `None` entries: the host's KVM has no stats fd.
#[derive(Debug, Default)]
pub struct KvmStatsSources {
    pub vm: Option<StatsFd>,
    pub vcpus: Vec<Option<StatsFd>>,
}

impl KvmStatsSources {
    /// Reads every counter now. Fails only when the host has no stats fd at all.
    pub fn snapshot(&self) -> Result<KvmStatsSnapshot, KvmStatsError> {
        let Some(vm) = &self.vm else {
            return Err(KvmStatsError::Unsupported(
                std::io::Error::from_raw_os_error(libc::ENOTTY),
            ));
        };
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| {
                v.as_ref()
                    .map(StatsFd::read)
                    .transpose()
                    .map(Option::unwrap_or_default)
            })
            .collect::<Result<_, _>>()?;
        Ok(KvmStatsSnapshot {
            vm: vm.read()?,
            vcpus,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_descriptor_names_kinds_and_offsets() {
        let name_size = 8usize;
        let mut block = Vec::new();
        for (flags, size, offset, name) in [(0u32, 1u16, 0u32, "exits"), (4, 3, 8, "halt_hist")] {
            block.extend_from_slice(&flags.to_le_bytes());
            block.extend_from_slice(&0i16.to_le_bytes());
            block.extend_from_slice(&size.to_le_bytes());
            block.extend_from_slice(&offset.to_le_bytes());
            block.extend_from_slice(&0u32.to_le_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size, 0);
            block.extend_from_slice(&n[..name_size]);
        }
        let d = parse_descriptors(&block, DESC_FIXED_LEN + name_size);
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].name.as_str(), d[0].kind, d[0].offset, d[0].size),
            ("exits", KvmStatKind::Cumulative, 0, 1)
        );
        assert_eq!(
            (d[1].name.as_str(), d[1].kind, d[1].offset, d[1].size),
            ("halt_his", KvmStatKind::Histogram, 8, 3)
        );
    }

    #[test]
    fn reads_live_vcpu_counters_where_kvm_has_them() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            return;
        };
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let Ok(vm_stats) = StatsFd::open(&vm) else {
            return;
        };
        let vcpu_stats = StatsFd::open(&vcpu).expect("a VM with a stats fd has vCPU stats fds");
        let sources = KvmStatsSources {
            vm: Some(vm_stats),
            vcpus: vec![Some(vcpu_stats)],
        };
        let snap = sources.snapshot().expect("snapshot");
        assert!(!snap.vm.is_empty());
        // A vCPU that never ran has exited zero times; the counter exists on every KVM with stats fds.
        assert_eq!(snap.vcpu_value(0, "exits"), Some(0));
        assert_eq!(snap.vcpu_total("exits"), Some(0));
        assert_eq!(snap.vcpu_total("no_such_stat"), None);
    }
}
