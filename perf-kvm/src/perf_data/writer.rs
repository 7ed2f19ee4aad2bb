//! Streaming perf.data writer: records are appended as they come; `flush` makes them durable and moves the
//! header's data size up to them; `finish` writes the feature sections and the final header. A file whose
//! recorder died has an empty feature bitmap (and data size 0 if it never flushed): see docs/perf-data.md.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmm::{GuestMode, Sample, SampleLoss};

mod salvage;

pub use salvage::Salvaged;

use super::encode::{self, FileSection, SampleFields, SampleId};
use super::{
    address_space_comm, DEFAULT_GUEST_KERNEL_ID, FIRST_ADDRESS_SPACE_PID, GUEST_KERNEL_MMAP_NAME,
    PERF_CONTEXT_GUEST_KERNEL, PERF_CONTEXT_GUEST_USER, PERF_CONTEXT_KERNEL, PERF_CONTEXT_USER,
    PERF_RECORD_MISC_GUEST_KERNEL, PERF_RECORD_MISC_GUEST_USER,
};

/// Callchains longer than this are cut: a record's size field is 16 bits, and perf's own limit is far lower.
const MAX_CALLCHAIN_LEN: usize = 4096;
/// Offset of `perf_file_header.data.size`.
const DATA_SIZE_OFFSET: u64 = 48;

#[derive(Debug, thiserror::Error)]
pub enum PerfDataError {
    #[error("cannot create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {} failed (records written before this error are kept)", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {} failed; {kept}", path.display())]
    Salvaged {
        path: PathBuf,
        kept: Salvaged,
        #[source]
        source: std::io::Error,
    },
    #[error("sampling frequency must be at least 1 Hz")]
    ZeroFrequency,
    #[error("guest kernel build id is {len} bytes; perf.data allows at most 20")]
    BuildIdTooLong { len: usize },
}

/// A guest user binary mapped at the same place in every address space (e.g. the test guest's ring-3 code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestUserMap {
    pub start: u64,
    pub len: u64,
    /// File offset of `start`.
    pub pgoff: u64,
    pub path: PathBuf,
}

/// Which context markers open a sample's callchain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CallchainContext {
    /// PERF_CONTEXT_KERNEL / PERF_CONTEXT_USER. perf 6.1 resolves these against the guest machine the sample
    /// belongs to when run as `perf kvm --host --guest ... report` or `perf script --guestvmlinux=...`, and
    /// rejects the guest markers ("invalid callchain context", chain discarded). The default.
    #[default]
    Plain,
    /// PERF_CONTEXT_GUEST_KERNEL / PERF_CONTEXT_GUEST_USER, the kernel ABI's markers for guest frames; only
    /// perf versions that know them (newer than 6.1) show such callchains.
    Guest,
}

/// What the file says about the recording, besides the samples.
#[derive(Debug, Clone, Default)]
pub struct RecordMeta {
    pub nr_vcpus: u32,
    pub freq_hz: u64,
    /// Whether samples carry callchains (`-g`); decides PERF_SAMPLE_CALLCHAIN.
    pub callchains: bool,
    pub guest_kernel_build_id: Option<Vec<u8>>,
    pub guest_kernel_path: Option<PathBuf>,
    /// Guest-virtual range of the kernel image; without it the kernel map covers the whole address space.
    pub guest_kernel_range: Option<std::ops::Range<u64>>,
    pub guest_user_maps: Vec<GuestUserMap>,
    /// The recording command line, for HEADER_CMDLINE.
    pub cmdline: Vec<String>,
    pub callchain_context: CallchainContext,
    pub event: super::SampledEvent,
}

pub struct PerfDataWriter {
    out: BufWriter<File>,
    path: PathBuf,
    meta: RecordMeta,
    attr: Vec<u8>,
    data_offset: u64,
    data_size: u64,
    period_ns: u64,
    /// CR3 → pid, in order of first appearance.
    address_spaces: HashMap<u64, u32>,
    /// Samples handed to `write_sample` (some may still sit in the buffer).
    samples: u64,
    /// What the last successful `flush` made durable: where [`Self::salvage`] starts counting what is on disk.
    flushed: Flushed,
}

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Flushed {
    pub data_size: u64,
    pub samples: u64,
}

impl PerfDataWriter {
    /// Creates (truncates) `path` and writes the header, attribute and the guest kernel map.
    pub fn create(path: &Path, meta: &RecordMeta) -> Result<Self, PerfDataError> {
        if meta.freq_hz == 0 {
            return Err(PerfDataError::ZeroFrequency);
        }
        if let Some(id) = &meta.guest_kernel_build_id {
            if id.len() > 20 {
                return Err(PerfDataError::BuildIdTooLong { len: id.len() });
            }
        }
        let mut meta = meta.clone();
        if meta.guest_kernel_build_id.is_none() {
            // Best effort: a kernel image without a readable build-id note just goes without HEADER_BUILD_ID.
            if let Some(kernel) = &meta.guest_kernel_path {
                meta.guest_kernel_build_id = symbols::build_id(kernel)
                    .ok()
                    .flatten()
                    .filter(|id| id.len() <= 20);
            }
        }
        // Readable too: after a write error, `salvage` reads back what reached the disk.
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| PerfDataError::Create {
                path: path.to_owned(),
                source,
            })?;
        let attr = encode::event_attr(meta.event, meta.freq_hz, meta.callchains);
        let attrs_section = FileSection {
            offset: encode::FILE_HEADER_SIZE,
            size: encode::FILE_ATTR_SIZE,
        };
        let data_offset = attrs_section.offset + attrs_section.size;
        let mut writer = Self {
            out: BufWriter::with_capacity(256 * 1024, file),
            path: path.to_owned(),
            meta: meta.clone(),
            attr,
            data_offset,
            data_size: 0,
            period_ns: (1_000_000_000 / meta.freq_hz).max(1),
            address_spaces: HashMap::new(),
            samples: 0,
            flushed: Flushed::default(),
        };
        // Data size 0 and no features: unfinished, until `flush` and `finish` rewrite the header.
        let header = encode::file_header(
            attrs_section,
            FileSection {
                offset: data_offset,
                size: 0,
            },
            &[],
        );
        let mut prologue = header;
        prologue.extend_from_slice(&writer.attr);
        prologue.extend_from_slice(&[0u8; 16]); // the attr's id section: no ids
        writer.put(&prologue)?;
        writer.write_kernel_mmap()?;
        // A recorder killed before its first periodic flush still leaves a header that says what it is.
        writer.flush()?;
        Ok(writer)
    }

    fn write_kernel_mmap(&mut self) -> Result<(), PerfDataError> {
        let range = self.meta.guest_kernel_range.clone().unwrap_or(0..u64::MAX);
        let record = encode::mmap_record(&encode::MmapFields {
            misc: PERF_RECORD_MISC_GUEST_KERNEL,
            pid: DEFAULT_GUEST_KERNEL_ID,
            tid: DEFAULT_GUEST_KERNEL_ID,
            start: range.start,
            len: range.end.saturating_sub(range.start),
            pgoff: 0,
            filename: GUEST_KERNEL_MMAP_NAME,
            id: SampleId {
                pid: DEFAULT_GUEST_KERNEL_ID,
                tid: DEFAULT_GUEST_KERNEL_ID,
                time: 0,
                cpu: 0,
            },
        });
        self.put_record(&record)
    }

    /// The pid standing for `cr3`'s address space; announces a new one with COMM and its user maps.
    fn address_space_pid(&mut self, cr3: u64, time: u64, cpu: u32) -> Result<u32, PerfDataError> {
        if let Some(&pid) = self.address_spaces.get(&cr3) {
            return Ok(pid);
        }
        let pid = FIRST_ADDRESS_SPACE_PID + self.address_spaces.len() as u32;
        self.address_spaces.insert(cr3, pid);
        let id = SampleId {
            pid,
            tid: pid,
            time,
            cpu,
        };
        let comm = encode::comm_record(
            PERF_RECORD_MISC_GUEST_USER,
            pid,
            pid,
            &address_space_comm(cr3),
            &id,
        );
        self.put_record(&comm)?;
        for map in self.meta.guest_user_maps.clone() {
            let record = encode::mmap_record(&encode::MmapFields {
                misc: PERF_RECORD_MISC_GUEST_USER,
                pid,
                tid: pid,
                start: map.start,
                len: map.len,
                pgoff: map.pgoff,
                filename: &map.path.to_string_lossy(),
                id,
            });
            self.put_record(&record)?;
        }
        Ok(pid)
    }

    pub fn write_sample(&mut self, sample: &Sample) -> Result<(), PerfDataError> {
        let pid = self.address_space_pid(sample.cr3, sample.time_ns, sample.vcpu)?;
        let (misc, context) = match (sample.mode, self.meta.callchain_context) {
            (GuestMode::Kernel, CallchainContext::Plain) => {
                (PERF_RECORD_MISC_GUEST_KERNEL, PERF_CONTEXT_KERNEL)
            }
            (GuestMode::User, CallchainContext::Plain) => {
                (PERF_RECORD_MISC_GUEST_USER, PERF_CONTEXT_USER)
            }
            (GuestMode::Kernel, CallchainContext::Guest) => {
                (PERF_RECORD_MISC_GUEST_KERNEL, PERF_CONTEXT_GUEST_KERNEL)
            }
            (GuestMode::User, CallchainContext::Guest) => {
                (PERF_RECORD_MISC_GUEST_USER, PERF_CONTEXT_GUEST_USER)
            }
        };
        // perf's callchains start with the context marker and the sampled ip itself.
        let chain: Vec<u64> = if self.meta.callchains {
            let kept = sample.callchain.len().min(MAX_CALLCHAIN_LEN);
            [context, sample.rip]
                .into_iter()
                .chain(sample.callchain[..kept].iter().copied())
                .collect()
        } else {
            Vec::new()
        };
        let record = encode::sample_record(&SampleFields {
            misc,
            ip: sample.rip,
            id: SampleId {
                pid,
                tid: pid,
                time: sample.time_ns,
                cpu: sample.vcpu,
            },
            period: sample.period.unwrap_or(self.period_ns),
            callchain: self.meta.callchains.then_some(&chain[..]),
        });
        self.put_record(&record)?;
        self.samples += 1;
        Ok(())
    }

    /// Records samples lost since the previous call (`delta`, all causes together: perf has one count).
    pub fn write_lost(&mut self, delta: &SampleLoss, time_ns: u64) -> Result<(), PerfDataError> {
        let lost = delta.lost();
        if lost == 0 {
            return Ok(());
        }
        let id = SampleId {
            pid: DEFAULT_GUEST_KERNEL_ID,
            tid: DEFAULT_GUEST_KERNEL_ID,
            time: time_ns,
            cpu: 0,
        };
        self.put_record(&encode::lost_samples_record(lost, &id))
    }

    /// Pushes buffered records to the file and records their extent in the header, so that a killed recorder
    /// leaves a file real perf reads up to here. The feature bitmap stays empty until `finish`: that is how a
    /// reader tells an unfinished file.
    pub fn flush(&mut self) -> Result<(), PerfDataError> {
        let path = &self.path;
        let io = |source| PerfDataError::Write {
            path: path.clone(),
            source,
        };
        self.out.flush().map_err(io)?;
        // pwrite leaves the append position alone.
        self.out
            .get_ref()
            .write_all_at(&self.data_size.to_le_bytes(), DATA_SIZE_OFFSET)
            .map_err(io)?;
        self.flushed = Flushed {
            data_size: self.data_size,
            samples: self.samples,
        };
        Ok(())
    }

    /// Writes the feature sections and the final header. The file is complete and valid afterwards. When a write
    /// fails (disk full), the file is closed over the records already on disk instead: see [`Self::salvage`].
    pub fn finish(mut self) -> Result<(), PerfDataError> {
        match self.write_tail() {
            Ok(()) => Ok(()),
            Err(e) => Err(self.salvage(e)),
        }
    }

    fn write_tail(&mut self) -> Result<(), PerfDataError> {
        let (tail, feature_ids) = self.feature_tail(self.data_offset + self.data_size);
        self.put(&tail)?;
        let header = self.header(self.data_size, &feature_ids);
        let path = self.path.clone();
        let io = |source| PerfDataError::Write {
            path: path.clone(),
            source,
        };
        self.out.flush().map_err(io)?;
        let file = self.out.get_mut();
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&header).map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// The feature section table and the sections, for a data section ending at `table_offset`; and the feature
    /// ids for the header's bitmap.
    fn feature_tail(&self, table_offset: u64) -> (Vec<u8>, Vec<u32>) {
        feature_tail(&self.feature_sections(), table_offset)
    }

    fn header(&self, data_size: u64, feature_ids: &[u32]) -> Vec<u8> {
        file_header(self.data_offset, data_size, feature_ids)
    }

    /// Feature sections in ascending feature-bit order, as the header's section table requires.
    fn feature_sections(&self) -> Vec<(u32, Vec<u8>)> {
        let mut features = Vec::new();
        if let Some(build_id) = &self.meta.guest_kernel_build_id {
            if let Some(event) = encode::build_id_event(
                PERF_RECORD_MISC_GUEST_KERNEL,
                DEFAULT_GUEST_KERNEL_ID,
                build_id,
                GUEST_KERNEL_MMAP_NAME,
            ) {
                features.push((encode::HEADER_BUILD_ID, event));
            }
        }
        let uname = host_uname();
        features.push((
            encode::HEADER_HOSTNAME,
            encode::feature_string(&uname.hostname),
        ));
        features.push((
            encode::HEADER_OSRELEASE,
            encode::feature_string(&uname.release),
        ));
        features.push((
            encode::HEADER_VERSION,
            encode::feature_string(concat!("perf-kvm ", env!("CARGO_PKG_VERSION"))),
        ));
        features.push((encode::HEADER_ARCH, encode::feature_string(&uname.machine)));
        let vcpus = self.meta.nr_vcpus.max(1);
        features.push((encode::HEADER_NRCPUS, encode::feature_nrcpus(vcpus, vcpus)));
        features.push((
            encode::HEADER_CMDLINE,
            encode::feature_cmdline(&self.meta.cmdline),
        ));
        features.push((
            encode::HEADER_EVENT_DESC,
            encode::feature_event_desc(&self.attr, self.meta.event.name()),
        ));
        features
    }

    fn put_record(&mut self, record: &[u8]) -> Result<(), PerfDataError> {
        self.put(record)?;
        self.data_size += record.len() as u64;
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), PerfDataError> {
        let path = &self.path;
        self.out
            .write_all(bytes)
            .map_err(|source| PerfDataError::Write {
                path: path.clone(),
                source,
            })
    }
}

fn feature_tail(features: &[(u32, Vec<u8>)], table_offset: u64) -> (Vec<u8>, Vec<u32>) {
    let mut next_content = table_offset + 16 * features.len() as u64;
    let mut tail = Vec::new();
    for (_, content) in features {
        tail.extend_from_slice(&next_content.to_le_bytes());
        tail.extend_from_slice(&(content.len() as u64).to_le_bytes());
        next_content += content.len() as u64;
    }
    for (_, content) in features {
        tail.extend_from_slice(content);
    }
    (tail, features.iter().map(|(id, _)| *id).collect())
}

fn file_header(data_offset: u64, data_size: u64, feature_ids: &[u32]) -> Vec<u8> {
    encode::file_header(
        FileSection {
            offset: encode::FILE_HEADER_SIZE,
            size: encode::FILE_ATTR_SIZE,
        },
        FileSection {
            offset: data_offset,
            size: data_size,
        },
        feature_ids,
    )
}

struct HostUname {
    hostname: String,
    release: String,
    machine: String,
}

fn host_uname() -> HostUname {
    // SAFETY: utsname is plain old data (arrays of c_char), for which all-zero bytes are a valid value.
    let mut raw: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `raw` is a valid, writable utsname.
    let ok = unsafe { libc::uname(&mut raw) } == 0;
    let field = |chars: &[libc::c_char]| -> String {
        let bytes: Vec<u8> = chars
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    if ok {
        HostUname {
            hostname: field(&raw.nodename),
            release: field(&raw.release),
            machine: field(&raw.machine),
        }
    } else {
        HostUname {
            hostname: String::new(),
            release: String::new(),
            machine: std::env::consts::ARCH.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cycles recording names its event `cycles` and weights each sample by its own period, as the PMU varies
    /// it in frequency mode.
    #[test]
    fn cycles_samples_keep_their_periods() {
        let path =
            std::env::temp_dir().join(format!("perf-kvm-cycles-{}.data", std::process::id()));
        let meta = RecordMeta {
            nr_vcpus: 1,
            freq_hz: 1000,
            event: super::super::SampledEvent::Cycles,
            ..Default::default()
        };
        let mut w = PerfDataWriter::create(&path, &meta).unwrap();
        for (rip, period) in [
            (0xffff_ffff_8100_0000u64, 3_000u64),
            (0xffff_ffff_8200_0000, 1_000),
        ] {
            w.write_sample(&Sample {
                time_ns: 1,
                vcpu: 0,
                rip,
                mode: GuestMode::Kernel,
                cr3: 0,
                callchain: Vec::new(),
                period: Some(period),
            })
            .unwrap();
        }
        w.finish().unwrap();
        let mut out = Vec::new();
        let options = crate::report::ReportOptions::new(path.clone());
        crate::report::run_report(&options, &mut out).unwrap();
        std::fs::remove_file(&path).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("of event 'cycles'"), "{text}");
        assert!(text.contains("Event count (approx.): 4000"), "{text}");
        assert!(text.contains("75.00%") && text.contains("25.00%"), "{text}");
    }
}
