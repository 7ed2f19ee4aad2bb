//! Memory-slot surgery for watchpoints by page protection: a written-watched page becomes a `KVM_MEM_READONLY`
//! slot of its own (stores exit as MMIO), a read-watched page gets no slot at all (loads exit as MMIO too).
//!
//! Slots may only change while every vCPU is out of `KVM_RUN`; the debugger calls this only while stopped.

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;

pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("KVM_SET_USER_MEMORY_REGION failed for slot {slot} (guest physical {gpa:#x}, {len:#x} bytes)")]
    SetRegion {
        slot: u32,
        gpa: u64,
        len: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// How a guest-physical page is protected for a watchpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// Stores exit (write watches only).
    ReadOnly,
    /// Loads and stores exit (read or access watches).
    Unmapped,
}

/// One RAM region as the VMM mapped it at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    pub gpa: u64,
    pub len: u64,
    pub host: u64,
}

/// One KVM memory slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotSpec {
    pub gpa: u64,
    pub len: u64,
    pub host: u64,
    pub readonly: bool,
}

/// The slots that map `regions` with the protected pages carved out.
pub fn layout(regions: &[RamRegion], protected: &BTreeMap<u64, Protection>) -> Vec<SlotSpec> {
    let mut slots = Vec::new();
    for region in regions {
        let end = region.gpa + region.len;
        let mut cursor = region.gpa;
        let push = |slots: &mut Vec<SlotSpec>, gpa: u64, len: u64, readonly: bool| {
            if len > 0 {
                slots.push(SlotSpec {
                    gpa,
                    len,
                    host: region.host + (gpa - region.gpa),
                    readonly,
                });
            }
        };
        for (&page, &protection) in protected.range(region.gpa..end) {
            push(&mut slots, cursor, page - cursor, false);
            if protection == Protection::ReadOnly {
                push(&mut slots, page, PAGE_SIZE.min(end - page), true);
            }
            cursor = (page + PAGE_SIZE).min(end);
        }
        push(&mut slots, cursor, end - cursor, false);
    }
    slots
}

/// The VM's memory slots, as currently installed.
pub struct MemorySlots {
    vm_fd: Arc<VmFd>,
    regions: Vec<RamRegion>,
    installed: Vec<SlotSpec>,
}

impl MemorySlots {
    /// `regions` are installed as slots `0..regions.len()` already (the VMM did it at boot).
    pub fn new(vm_fd: Arc<VmFd>, regions: Vec<RamRegion>) -> Self {
        let installed = layout(&regions, &BTreeMap::new());
        MemorySlots {
            vm_fd,
            regions,
            installed,
        }
    }

    /// Reinstalls the slots for this set of protected pages. Call only while every vCPU is out of `KVM_RUN`.
    pub fn apply(&mut self, protected: &BTreeMap<u64, Protection>) -> Result<(), SlotError> {
        let wanted = layout(&self.regions, protected);
        if wanted == self.installed {
            return Ok(());
        }
        for slot in 0..self.installed.len() as u32 {
            self.set(slot, None)?;
        }
        self.installed.clear();
        for (slot, spec) in wanted.iter().enumerate() {
            self.set(slot as u32, Some(spec))?;
            self.installed.push(*spec);
        }
        Ok(())
    }

    fn set(&self, slot: u32, spec: Option<&SlotSpec>) -> Result<(), SlotError> {
        let region = match spec {
            Some(s) => kvm_userspace_memory_region {
                slot,
                guest_phys_addr: s.gpa,
                memory_size: s.len,
                userspace_addr: s.host,
                flags: if s.readonly { KVM_MEM_READONLY } else { 0 },
            },
            // A zero size deletes the slot.
            None => kvm_userspace_memory_region {
                slot,
                ..Default::default()
            },
        };
        // SAFETY: every host range comes from a RAM region the VM mapped at boot and keeps mapped (through
        // VmControl) for as long as the VM fd lives.
        unsafe { self.vm_fd.set_user_memory_region(region) }.map_err(|source| {
            SlotError::SetRegion {
                slot,
                gpa: region.guest_phys_addr,
                len: region.memory_size,
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: RamRegion = RamRegion {
        gpa: 0,
        len: 0x10_0000,
        host: 0x7f00_0000_0000,
    };

    #[test]
    fn no_protection_keeps_one_slot_per_region() {
        assert_eq!(
            layout(&[RAM], &BTreeMap::new()),
            vec![SlotSpec {
                gpa: 0,
                len: 0x10_0000,
                host: RAM.host,
                readonly: false
            }]
        );
    }

    #[test]
    fn protected_pages_are_carved_out() {
        let protected = BTreeMap::from([
            (0x3000, Protection::ReadOnly),
            (0x5000, Protection::Unmapped),
            (0xff000, Protection::ReadOnly),
        ]);
        let slots = layout(&[RAM], &protected);
        let summary: Vec<_> = slots.iter().map(|s| (s.gpa, s.len, s.readonly)).collect();
        assert_eq!(
            summary,
            vec![
                (0, 0x3000, false),
                (0x3000, 0x1000, true),
                (0x4000, 0x1000, false),
                (0x6000, 0xf9000, false),
                (0xff000, 0x1000, true),
            ]
        );
        assert_eq!(slots[3].host, RAM.host + 0x6000);
    }

    #[test]
    fn pages_outside_every_region_are_ignored() {
        let protected = BTreeMap::from([(0x20_0000, Protection::Unmapped)]);
        assert_eq!(layout(&[RAM], &protected).len(), 1);
    }
}
