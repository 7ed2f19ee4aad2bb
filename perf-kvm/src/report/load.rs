//! Loading a perf.data file (ours or real perf's) into plain profile data, through `linux-perf-data`.
//! An unfinished file (recorder killed) is detected by its empty feature bitmap and read up to its last
//! complete record.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use linux_perf_data::linux_perf_event_reader::{CpuMode, EventRecord, RecordType};
use linux_perf_data::{PerfFileReader, PerfFileRecord};

use crate::perf_data::PERF_CONTEXT_MAX;

const FILE_HEADER_SIZE: usize = 104;
const DATA_OFFSET_AT: usize = 40;
const DATA_SIZE_AT: usize = 48;
const FEATURES_AT: usize = 72;
const RECORD_HEADER_SIZE: usize = 8;
/// Feature bit of `HEADER_EVENT_DESC`, the attribute descriptions the parser reads first.
const FEATURE_EVENT_DESC: u32 = 12;
/// A `perf_file_section`: offset and size, two u64.
const FILE_SECTION_SIZE: u64 = 16;
const PERF_CONTEXT_HV: u64 = -32i64 as u64;
const PERF_CONTEXT_KERNEL: u64 = -128i64 as u64;
const PERF_CONTEXT_USER: u64 = -512i64 as u64;
const PERF_CONTEXT_GUEST_KERNEL: u64 = -2176i64 as u64;
const PERF_CONTEXT_GUEST_USER: u64 = -2560i64 as u64;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a perf.data file (no PERFILE2 header)", path.display())]
    NotPerfData { path: PathBuf },
    #[error("{} is a corrupt perf.data file: {reason}", path.display())]
    BadLayout { path: PathBuf, reason: String },
    #[error("{} is a corrupt perf.data file", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: linux_perf_data::Error,
    },
}

/// Which side of the hypervisor, and which ring, a sample or frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    GuestKernel,
    GuestUser,
    HostKernel,
    HostUser,
    Unknown,
}

impl Mode {
    fn from_cpu_mode(mode: CpuMode) -> Self {
        match mode {
            CpuMode::GuestKernel => Mode::GuestKernel,
            CpuMode::GuestUser => Mode::GuestUser,
            CpuMode::Kernel => Mode::HostKernel,
            CpuMode::User => Mode::HostUser,
            _ => Mode::Unknown,
        }
    }

    /// perf's level mark: `[g]` guest kernel, `[u]` guest user, `[k]` kernel, `[.]` user, `[H]` hypervisor.
    pub fn mark(self) -> &'static str {
        match self {
            Mode::GuestKernel => "[g]",
            Mode::GuestUser => "[u]",
            Mode::HostKernel => "[k]",
            Mode::HostUser => "[.]",
            Mode::Unknown => "[H]",
        }
    }

    pub fn is_kernel(self) -> bool {
        matches!(self, Mode::GuestKernel | Mode::HostKernel)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub addr: u64,
    pub mode: Mode,
}

#[derive(Debug, Clone)]
pub struct ProfileSample {
    pub pid: i32,
    pub cpu: u32,
    pub period: u64,
    /// The sampled ip first, then its callers; context markers resolved into each frame's mode.
    pub frames: Vec<Frame>,
}

#[derive(Debug, Clone)]
pub struct Mapping {
    pub start: u64,
    pub len: u64,
    pub pgoff: u64,
    pub path: String,
}

#[derive(Debug, Default)]
pub struct Profile {
    pub samples: Vec<ProfileSample>,
    pub comms: HashMap<i32, String>,
    /// User-space mappings per pid (guest user maps from MMAP records with a guest cpumode included).
    pub mappings: HashMap<i32, Vec<Mapping>>,
    pub lost: u64,
    pub event_name: String,
    pub has_callchains: bool,
    /// Set when the recorder never finished the file; says how much was readable.
    pub unfinished: Option<String>,
    /// Records the parser could not read (corruption); the report covers the rest.
    pub skipped_records: u64,
    /// Records of types this reader does not know (newer kernels, other tools), by type: skipped, and counted.
    pub unknown_records: std::collections::BTreeMap<u32, u64>,
    /// The guest kernel image the recorder named in HEADER_BUILD_ID, with its build-id.
    pub guest_kernel_image: Option<(std::path::PathBuf, Vec<u8>)>,
}

pub fn load(path: &Path) -> Result<Profile, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    load_bytes(bytes, path)
}

/// [`load`] on a file already in memory; `path` only names it in errors.
pub fn load_bytes(mut bytes: Vec<u8>, path: &Path) -> Result<Profile, LoadError> {
    if bytes.len() < 8 || &bytes[..8] != b"PERFILE2" {
        return Err(LoadError::NotPerfData {
            path: path.to_owned(),
        });
    }
    if bytes.len() < FILE_HEADER_SIZE {
        return Err(LoadError::BadLayout {
            path: path.to_owned(),
            reason: format!(
                "the file ends inside its header ({} of {FILE_HEADER_SIZE} bytes)",
                bytes.len()
            ),
        });
    }
    let unfinished = repair_unfinished(&mut bytes);
    check_layout(&bytes).map_err(|reason| LoadError::BadLayout {
        path: path.to_owned(),
        reason,
    })?;
    let corrupt = |source| LoadError::Corrupt {
        path: path.to_owned(),
        source,
    };
    let parsed = std::panic::catch_unwind(|| PerfFileReader::parse_file(Cursor::new(&bytes[..])))
        .map_err(|_| LoadError::BadLayout {
        path: path.to_owned(),
        reason: "the parser gave up on it".into(),
    })?;
    let PerfFileReader {
        mut perf_file,
        mut record_iter,
    } = parsed.map_err(corrupt)?;
    let mut profile = Profile {
        unfinished,
        ..Profile::default()
    };
    if let Ok(ids) = perf_file.build_ids() {
        profile.guest_kernel_image = ids.get(&linux_perf_data::DsoKey::GuestKernel).map(|info| {
            (
                String::from_utf8_lossy(&info.path).into_owned().into(),
                info.build_id.clone(),
            )
        });
    }
    if let Some(attr) = perf_file.event_attributes().first() {
        profile.event_name = attr.name().unwrap_or("cpu-clock").to_owned();
    }
    // The parser can panic (arithmetic overflow, slicing) on corrupt lengths: what was read before stays.
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        read_records(&mut perf_file, &mut record_iter, &mut profile)
    }));
    match read {
        Ok(result) => result.map_err(corrupt)?,
        Err(_) => profile.skipped_records += 1,
    }
    Ok(profile)
}

fn read_records(
    perf_file: &mut linux_perf_data::PerfFile,
    record_iter: &mut linux_perf_data::PerfRecordIter<Cursor<&[u8]>>,
    profile: &mut Profile,
) -> Result<(), linux_perf_data::Error> {
    while let Some(record) = record_iter.next_record(perf_file)? {
        let record_type = match &record {
            PerfFileRecord::EventRecord { record, .. } => record.record_type.0,
            PerfFileRecord::UserRecord(user) => user.record_type.record_type().0,
        };
        if !is_known_record_type(record_type) {
            *profile.unknown_records.entry(record_type).or_default() += 1;
            continue;
        }
        let PerfFileRecord::EventRecord { record, .. } = record else {
            continue;
        };
        if record.record_type == RecordType::LOST_SAMPLES {
            let data = record.data.as_slice();
            if let Some(lost) = data.get(..8) {
                let lost = u64::from_le_bytes(lost.try_into().expect("8 bytes"));
                profile.lost = profile.lost.saturating_add(lost);
            }
            continue;
        }
        // A record the parser rejects is skipped, not fatal: the rest of the profile is still worth showing.
        let Ok(parsed) = record.parse() else {
            profile.skipped_records += 1;
            continue;
        };
        match parsed {
            EventRecord::Sample(sample) => {
                let mode = Mode::from_cpu_mode(sample.cpu_mode);
                let ip = sample.ip.unwrap_or(0);
                let frames = match &sample.callchain {
                    Some(chain) => {
                        profile.has_callchains = true;
                        frames_from_callchain(
                            (0..chain.len()).filter_map(|i| chain.get(i)),
                            ip,
                            mode,
                        )
                    }
                    None => vec![Frame { addr: ip, mode }],
                };
                profile.samples.push(ProfileSample {
                    pid: sample.pid.unwrap_or(-1),
                    cpu: sample.cpu.unwrap_or(0),
                    period: sample.period.unwrap_or(1).max(1),
                    frames,
                });
            }
            EventRecord::Comm(comm) => {
                profile.comms.insert(
                    comm.pid,
                    String::from_utf8_lossy(&comm.name.as_slice()).into_owned(),
                );
            }
            EventRecord::Mmap(mmap) => {
                let mapping = Mapping {
                    start: mmap.address,
                    len: mmap.length,
                    pgoff: mmap.page_offset,
                    path: String::from_utf8_lossy(&mmap.path.as_slice()).into_owned(),
                };
                profile.mappings.entry(mmap.pid).or_default().push(mapping);
            }
            EventRecord::Mmap2(mmap) => {
                let mapping = Mapping {
                    start: mmap.address,
                    len: mmap.length,
                    pgoff: mmap.page_offset,
                    path: String::from_utf8_lossy(&mmap.path.as_slice()).into_owned(),
                };
                profile.mappings.entry(mmap.pid).or_default().push(mapping);
            }
            EventRecord::Lost(lost) => profile.lost = profile.lost.saturating_add(lost.count),
            _ => {}
        }
    }
    Ok(())
}

/// Record types this reader knows, whether it uses them or not: the kernel's (1..=21, Linux 6.1), perf's own
/// (64..=83) and simpleperf's (32769..=32777). Anything else (a newer kernel's, a vendor tool's) is skipped and
/// counted, never taken for corruption.
fn is_known_record_type(record_type: u32) -> bool {
    matches!(record_type, 1..=21 | 64..=83 | 32769..=32777)
}

/// perf callchains include the sampled ip right after the first context marker; markers switch the mode of
/// the frames that follow.
fn frames_from_callchain(
    entries: impl Iterator<Item = u64>,
    ip: u64,
    sample_mode: Mode,
) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut mode = sample_mode;
    for entry in entries {
        if entry >= PERF_CONTEXT_MAX {
            mode = match entry {
                PERF_CONTEXT_KERNEL
                    if sample_mode == Mode::GuestKernel || sample_mode == Mode::GuestUser =>
                {
                    Mode::GuestKernel
                }
                PERF_CONTEXT_USER
                    if sample_mode == Mode::GuestKernel || sample_mode == Mode::GuestUser =>
                {
                    Mode::GuestUser
                }
                PERF_CONTEXT_KERNEL => Mode::HostKernel,
                PERF_CONTEXT_USER => Mode::HostUser,
                PERF_CONTEXT_GUEST_KERNEL => Mode::GuestKernel,
                PERF_CONTEXT_GUEST_USER => Mode::GuestUser,
                PERF_CONTEXT_HV => Mode::Unknown,
                _ => mode,
            };
            continue;
        }
        frames.push(Frame { addr: entry, mode });
    }
    if frames.first().map(|f| f.addr) != Some(ip) {
        frames.insert(
            0,
            Frame {
                addr: ip,
                mode: sample_mode,
            },
        );
    }
    frames
}

/// The parser trusts the header's sections (it overflows or allocates whatever they say), so they are checked
/// against the file first.
fn check_layout(bytes: &[u8]) -> Result<(), String> {
    let len = bytes.len() as u64;
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let header_size = u64_at(8);
    if header_size != FILE_HEADER_SIZE as u64 {
        return Err(format!("header size {header_size}, expected {FILE_HEADER_SIZE} (pipe-mode files are not supported)"));
    }
    let attr_size = u64_at(16);
    let section = |name: &str, at: usize| -> Result<(u64, u64), String> {
        let (offset, size) = (u64_at(at), u64_at(at + 8));
        match offset.checked_add(size) {
            Some(end) if end <= len => Ok((offset, size)),
            _ => Err(format!(
                "{name} section {offset:#x}+{size:#x} lies outside the {len}-byte file"
            )),
        }
    };
    let (_, attrs_size) = section("attribute", 24)?;
    let (data_offset, data_size) = section("data", 40)?;
    let (types_offset, types_size) = section("event type", 56)?;
    if attr_size < 16 + 8 || attrs_size % attr_size != 0 || attrs_size == 0 {
        return Err(format!(
            "attribute section of {attrs_size} bytes does not hold {attr_size}-byte attributes"
        ));
    }
    // Feature sections follow the data, one per bit set in the bitmap, in bit order.
    let feature_bits =
        (0..256u32).filter(|bit| bytes[FEATURES_AT + (bit / 8) as usize] & (1 << (bit % 8)) != 0);
    let table = data_offset + data_size;
    let mut has_event_desc = false;
    for (i, bit) in (0u64..).zip(feature_bits) {
        let at = table + FILE_SECTION_SIZE * i;
        if at + FILE_SECTION_SIZE > len {
            return Err(format!(
                "feature section table ends past the {len}-byte file"
            ));
        }
        let (offset, size) = section("feature", at as usize)?;
        if bit == FEATURE_EVENT_DESC {
            has_event_desc = true;
            check_event_desc(&bytes[offset as usize..(offset + size) as usize])?;
        }
    }
    // Without event descriptions the parser reads the old event-type section: an attribute and the section of
    // its ids per entry, sized by what each claims.
    if !has_event_desc && types_size != 0 {
        let entry = attr_size + FILE_SECTION_SIZE;
        for i in 0..types_size / entry {
            section("event id", (types_offset + i * entry + attr_size) as usize)?;
        }
    }
    // Every record header must fit the data section: the parser would stop at a bad one with no offset to show.
    let data_end = data_offset + data_size;
    let mut at = data_offset;
    while at < data_end {
        let size = if at + RECORD_HEADER_SIZE as u64 <= data_end {
            u64::from(u16::from_le_bytes([
                bytes[at as usize + 6],
                bytes[at as usize + 7],
            ]))
        } else {
            0
        };
        if size < RECORD_HEADER_SIZE as u64 || at + size > data_end {
            return Err(format!(
                "the record at offset {at:#x} claims {size} bytes, but {} remain in the data section \
                 (records must be at least {RECORD_HEADER_SIZE})",
                data_end - at
            ));
        }
        at += size;
    }
    Ok(())
}

/// `HEADER_EVENT_DESC`: `nr`, `attr_size`, then per event the attribute, `nr_ids`, a length-prefixed name and
/// `nr_ids` ids. The parser reserves memory for whatever counts it reads, so every count must fit the section.
fn check_event_desc(section: &[u8]) -> Result<(), String> {
    let u32_at = |at: usize| {
        section
            .get(at..at.checked_add(4)?)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
    };
    let too_short = || format!("event description of {} bytes is cut short", section.len());
    let events = u32_at(0).ok_or_else(too_short)?;
    let attr_size = u32_at(4).ok_or_else(too_short)?;
    let mut at = 8usize;
    // Every event takes at least 8 bytes, so a huge count fails within section.len() / 8 rounds.
    for _ in 0..events {
        at = at.checked_add(attr_size).ok_or_else(too_short)?;
        let ids = u32_at(at).ok_or_else(too_short)?;
        let name_len = u32_at(at + 4).ok_or_else(too_short)?;
        at = ids
            .checked_mul(8)
            .and_then(|ids_len| (at + 8).checked_add(name_len)?.checked_add(ids_len))
            .filter(|&end| end <= section.len())
            .ok_or_else(too_short)?;
    }
    Ok(())
}

/// For a file whose feature bitmap is empty (the writer never finished): cut the data section at the last
/// complete record so the parser accepts it, and say so.
fn repair_unfinished(bytes: &mut [u8]) -> Option<String> {
    let features_empty = bytes[FEATURES_AT..FILE_HEADER_SIZE].iter().all(|&b| b == 0);
    if !features_empty {
        return None;
    }
    let u64_at =
        |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let data_offset = usize::try_from(u64_at(bytes, DATA_OFFSET_AT))
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let header_size = u64_at(bytes, DATA_SIZE_AT);
    let mut end = data_offset;
    while end + RECORD_HEADER_SIZE <= bytes.len() {
        let size = usize::from(u16::from_le_bytes([bytes[end + 6], bytes[end + 7]]));
        if size < RECORD_HEADER_SIZE || end + size > bytes.len() {
            break;
        }
        end += size;
    }
    let readable = (end - data_offset) as u64;
    bytes[DATA_SIZE_AT..DATA_SIZE_AT + 8].copy_from_slice(&readable.to_le_bytes());
    let torn = bytes.len() - end;
    Some(format!(
        "the file was not finished (recorder killed?): header data size {header_size}, read {readable} bytes of \
         records{}",
        if torn > 0 { format!(", ignored {torn} trailing bytes of a torn record") } else { String::new() }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `scripts/fuzz perf_data`: an event description claiming ~2^32 events made the parser reserve
    /// hundreds of GiB and abort the process.
    #[test]
    fn huge_event_description_count_is_a_clear_error() {
        let bytes = include_bytes!("../../tests/data/fuzz-event-desc-huge-count.perf").to_vec();
        match load_bytes(bytes, Path::new("crasher.perf")) {
            Err(LoadError::BadLayout { reason, .. }) => {
                assert!(reason.contains("event description"), "{reason}")
            }
            other => panic!("expected a layout error, got {other:?}"),
        }
    }

    /// Found by `scripts/fuzz perf_data`: a sample whose callchain length overflows `nr * 8` panics inside
    /// linux-perf-event-reader; the report keeps what it read and counts the record as skipped.
    #[test]
    fn parser_panic_on_a_corrupt_sample_is_contained() {
        let bytes = include_bytes!("../../tests/data/fuzz-sample-callchain-overflow.perf").to_vec();
        let profile = load_bytes(bytes, Path::new("crasher.perf")).expect("a profile");
        assert!(profile.skipped_records > 0);
    }

    #[test]
    fn event_description_counts_must_fit_the_section() {
        let mut desc = Vec::new();
        desc.extend_from_slice(&1u32.to_le_bytes()); // one event
        desc.extend_from_slice(&8u32.to_le_bytes()); // 8-byte attribute
        desc.extend_from_slice(&[0; 8]);
        desc.extend_from_slice(&1u32.to_le_bytes()); // one id
        desc.extend_from_slice(&4u32.to_le_bytes()); // 4-byte name
        desc.extend_from_slice(b"cpu\0");
        desc.extend_from_slice(&7u64.to_le_bytes());
        assert_eq!(check_event_desc(&desc), Ok(()));
        assert!(check_event_desc(&desc[..desc.len() - 1]).is_err());
        let mut many_ids = desc.clone();
        many_ids[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(check_event_desc(&many_ids).is_err());
        let mut many_events = desc;
        many_events[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(check_event_desc(&many_events).is_err());
    }
}
