//! Records from a perf_event ring buffer, for the one attribute layout the PMU sampler opens, and their conversion
//! into the VMM's plain [`Sample`].
//!
//! The sampler asks for `PERF_SAMPLE_IP | PERF_SAMPLE_TID | PERF_SAMPLE_TIME | PERF_SAMPLE_PERIOD`, so a
//! `PERF_RECORD_SAMPLE` body is exactly `ip: u64, pid: u32, tid: u32, time: u64, period: u64` (perf_event.h
//! documents the order of the fields by sample_type bit).

use std::collections::HashMap;

use crate::{GuestMode, Sample};

/// `perf_event_header.type` values the sampler reads (include/uapi/linux/perf_event.h).
pub const PERF_RECORD_LOST: u32 = 2;
pub const PERF_RECORD_THROTTLE: u32 = 5;
pub const PERF_RECORD_UNTHROTTLE: u32 = 6;
pub const PERF_RECORD_SAMPLE: u32 = 9;

/// `perf_event_header.misc` cpumode values.
pub const PERF_RECORD_MISC_CPUMODE_MASK: u16 = 7;
pub const PERF_RECORD_MISC_KERNEL: u16 = 1;
pub const PERF_RECORD_MISC_USER: u16 = 2;
pub const PERF_RECORD_MISC_GUEST_KERNEL: u16 = 4;
pub const PERF_RECORD_MISC_GUEST_USER: u16 = 5;

/// The sample_type the sampler opens its events with.
pub const SAMPLE_TYPE: u64 = perf_event_open_sys::bindings::PERF_SAMPLE_IP as u64
    | perf_event_open_sys::bindings::PERF_SAMPLE_TID as u64
    | perf_event_open_sys::bindings::PERF_SAMPLE_TIME as u64
    | perf_event_open_sys::bindings::PERF_SAMPLE_PERIOD as u64;

/// Size of `struct perf_event_header`.
pub const HEADER_SIZE: usize = 8;
const SAMPLE_BODY_SIZE: usize = 32;

/// One `PERF_RECORD_SAMPLE` of [`SAMPLE_TYPE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawSample {
    pub misc: u16,
    pub ip: u64,
    pub pid: u32,
    pub tid: u32,
    pub time: u64,
    pub period: u64,
}

/// What one ring-buffer record means to the sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmuRecord {
    Sample(RawSample),
    /// The kernel dropped this many samples: the ring buffer was full.
    Lost(u64),
    /// The kernel throttled (or unthrottled) the event: too many interrupts per second.
    Throttle,
    /// Any other record type (the sampler asks for none, but newer kernels may add some).
    Other(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("perf record of {got} bytes is shorter than its header")]
    TooShort { got: usize },
    #[error("perf record header says {claimed} bytes, {got} are there")]
    SizeMismatch { claimed: usize, got: usize },
    #[error("perf sample record of {got} bytes; the sampler's layout needs {need}")]
    SampleTooShort { got: usize, need: usize },
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Parses one whole record (header included).
pub fn parse_record(record: &[u8]) -> Result<PmuRecord, RecordError> {
    if record.len() < HEADER_SIZE {
        return Err(RecordError::TooShort { got: record.len() });
    }
    let kind = u32_at(record, 0);
    let misc = u16::from_le_bytes([record[4], record[5]]);
    let size = u16::from_le_bytes([record[6], record[7]]) as usize;
    if size != record.len() {
        return Err(RecordError::SizeMismatch {
            claimed: size,
            got: record.len(),
        });
    }
    let body = &record[HEADER_SIZE..];
    Ok(match kind {
        PERF_RECORD_SAMPLE => {
            if body.len() < SAMPLE_BODY_SIZE {
                return Err(RecordError::SampleTooShort {
                    got: record.len(),
                    need: HEADER_SIZE + SAMPLE_BODY_SIZE,
                });
            }
            PmuRecord::Sample(RawSample {
                misc,
                ip: u64_at(body, 0),
                pid: u32_at(body, 8),
                tid: u32_at(body, 12),
                time: u64_at(body, 16),
                period: u64_at(body, 24),
            })
        }
        // struct { u64 id; u64 lost; struct sample_id; }
        PERF_RECORD_LOST if body.len() >= 16 => PmuRecord::Lost(u64_at(body, 8)),
        PERF_RECORD_THROTTLE | PERF_RECORD_UNTHROTTLE => PmuRecord::Throttle,
        other => PmuRecord::Other(other),
    })
}

/// Why a raw sample did not become a [`Sample`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Host kernel/user mode: the overflow landed outside the guest (possible around VM exits even with
    /// exclude_host).
    HostMode,
    /// A thread that is not one of the VM's vCPU threads.
    UnknownThread(u32),
}

/// Turns raw samples into the VMM's [`Sample`]: TID → vCPU index, cpumode → guest ring, time relative to the
/// recording's start. The PMU tells the guest's IP and ring only: no CR3 (every sample gets address space 0) and no
/// callchain.
#[derive(Debug, Clone)]
pub struct SampleConverter {
    vcpu_of_tid: HashMap<u32, u32>,
    /// CLOCK_MONOTONIC time at which the recording started; sample times are made relative to it.
    base_time_ns: u64,
}

impl SampleConverter {
    /// `vcpu_tids[i]` is the host thread id of vCPU `i`.
    pub fn new(vcpu_tids: &[u32], base_time_ns: u64) -> Self {
        SampleConverter {
            vcpu_of_tid: vcpu_tids
                .iter()
                .enumerate()
                .map(|(i, &tid)| (tid, i as u32))
                .collect(),
            base_time_ns,
        }
    }

    pub fn convert(&self, raw: &RawSample) -> Result<Sample, Rejected> {
        let mode = match raw.misc & PERF_RECORD_MISC_CPUMODE_MASK {
            PERF_RECORD_MISC_GUEST_KERNEL => GuestMode::Kernel,
            PERF_RECORD_MISC_GUEST_USER => GuestMode::User,
            _ => return Err(Rejected::HostMode),
        };
        let vcpu = *self
            .vcpu_of_tid
            .get(&raw.tid)
            .ok_or(Rejected::UnknownThread(raw.tid))?;
        Ok(Sample {
            time_ns: raw.time.saturating_sub(self.base_time_ns),
            vcpu,
            rip: raw.ip,
            mode,
            cr3: 0,
            callchain: Vec::new(),
            period: Some(raw.period.max(1)),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A record as the kernel lays it out: header (type, misc, size) then body.
    pub(crate) fn record(kind: u32, misc: u16, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&misc.to_le_bytes());
        out.extend_from_slice(&((HEADER_SIZE + body.len()) as u16).to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    pub(crate) fn sample_record(misc: u16, ip: u64, tid: u32, time: u64, period: u64) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&ip.to_le_bytes());
        body.extend_from_slice(&4242u32.to_le_bytes()); // pid: the VMM process
        body.extend_from_slice(&tid.to_le_bytes());
        body.extend_from_slice(&time.to_le_bytes());
        body.extend_from_slice(&period.to_le_bytes());
        record(PERF_RECORD_SAMPLE, misc, &body)
    }

    #[test]
    fn sample_fields_come_out_in_sample_type_order() {
        let bytes = sample_record(
            PERF_RECORD_MISC_GUEST_USER,
            0x40_1234,
            77,
            5_000_000,
            123_456,
        );
        assert_eq!(
            parse_record(&bytes),
            Ok(PmuRecord::Sample(RawSample {
                misc: PERF_RECORD_MISC_GUEST_USER,
                ip: 0x40_1234,
                pid: 4242,
                tid: 77,
                time: 5_000_000,
                period: 123_456,
            }))
        );
    }

    #[test]
    fn lost_throttle_and_unknown_records() {
        let mut lost = Vec::new();
        lost.extend_from_slice(&9u64.to_le_bytes()); // id
        lost.extend_from_slice(&17u64.to_le_bytes()); // lost
        lost.extend_from_slice(&[0u8; 24]); // sample_id trailer
        assert_eq!(
            parse_record(&record(PERF_RECORD_LOST, 0, &lost)),
            Ok(PmuRecord::Lost(17))
        );
        assert_eq!(
            parse_record(&record(PERF_RECORD_THROTTLE, 0, &[0; 24])),
            Ok(PmuRecord::Throttle)
        );
        assert_eq!(
            parse_record(&record(200, 0, &[1, 2, 3, 4, 5, 6, 7, 8])),
            Ok(PmuRecord::Other(200))
        );
    }

    #[test]
    fn malformed_records_are_errors() {
        assert_eq!(
            parse_record(&[1, 2, 3]),
            Err(RecordError::TooShort { got: 3 })
        );
        let mut bad = sample_record(PERF_RECORD_MISC_GUEST_KERNEL, 1, 1, 1, 1);
        bad.truncate(20);
        assert_eq!(
            parse_record(&bad),
            Err(RecordError::SizeMismatch {
                claimed: 40,
                got: 20
            })
        );
        let short = record(PERF_RECORD_SAMPLE, PERF_RECORD_MISC_GUEST_KERNEL, &[0; 16]);
        assert_eq!(
            parse_record(&short),
            Err(RecordError::SampleTooShort { got: 24, need: 40 })
        );
    }

    #[test]
    fn conversion_maps_tid_cpumode_time_and_period() {
        let conv = SampleConverter::new(&[100, 101, 102], 1_000);
        let raw = |misc, tid| RawSample {
            misc,
            ip: 0xffff_ffff_8100_0000,
            pid: 1,
            tid,
            time: 251_000,
            period: 2_000_000,
        };
        let s = conv
            .convert(&raw(PERF_RECORD_MISC_GUEST_KERNEL, 102))
            .unwrap();
        assert_eq!(s.vcpu, 2);
        assert_eq!(s.mode, GuestMode::Kernel);
        assert_eq!(s.rip, 0xffff_ffff_8100_0000);
        assert_eq!(s.time_ns, 250_000);
        assert_eq!(s.period, Some(2_000_000));
        assert!(s.callchain.is_empty());
        // Exact-match on the cpumode, not a bit test: misc carries other flags above the mask.
        let user = conv
            .convert(&raw(PERF_RECORD_MISC_GUEST_USER | 0x4000, 100))
            .unwrap();
        assert_eq!((user.vcpu, user.mode), (0, GuestMode::User));
        assert_eq!(
            conv.convert(&raw(PERF_RECORD_MISC_KERNEL, 100)),
            Err(Rejected::HostMode)
        );
        assert_eq!(
            conv.convert(&raw(PERF_RECORD_MISC_USER, 100)),
            Err(Rejected::HostMode)
        );
        assert_eq!(
            conv.convert(&raw(PERF_RECORD_MISC_GUEST_KERNEL, 999)),
            Err(Rejected::UnknownThread(999))
        );
    }
}
