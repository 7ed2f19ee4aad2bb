//! Byte layout of the perf.data pieces we write: file header, attribute, records, feature sections.
//! All little-endian, as written by perf on x86_64.

use super::SampledEvent;

/// `struct perf_file_header` is 104 bytes: magic, size, attr_size, 3 sections, 256-bit feature bitmap.
pub const FILE_HEADER_SIZE: u64 = 104;
/// We write `perf_event_attr` in its version-7 size (128 bytes).
pub const EVENT_ATTR_SIZE: u64 = 128;
/// `struct perf_file_attr`: the attribute followed by the section of its sample ids.
pub const FILE_ATTR_SIZE: u64 = EVENT_ATTR_SIZE + 16;

pub const PERF_TYPE_SOFTWARE: u32 = 1;
pub const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
pub const PERF_TYPE_HARDWARE: u32 = 0;
pub const PERF_COUNT_HW_CPU_CYCLES: u64 = 0;

pub const PERF_SAMPLE_IP: u64 = 1 << 0;
pub const PERF_SAMPLE_TID: u64 = 1 << 1;
pub const PERF_SAMPLE_TIME: u64 = 1 << 2;
pub const PERF_SAMPLE_CALLCHAIN: u64 = 1 << 5;
pub const PERF_SAMPLE_CPU: u64 = 1 << 7;
pub const PERF_SAMPLE_PERIOD: u64 = 1 << 8;

const ATTR_FLAG_MMAP: u64 = 1 << 8;
const ATTR_FLAG_COMM: u64 = 1 << 9;
const ATTR_FLAG_FREQ: u64 = 1 << 10;
const ATTR_FLAG_SAMPLE_ID_ALL: u64 = 1 << 18;
const ATTR_FLAG_EXCLUDE_HOST: u64 = 1 << 19;

pub const PERF_RECORD_MMAP: u32 = 1;
pub const PERF_RECORD_COMM: u32 = 3;
pub const PERF_RECORD_SAMPLE: u32 = 9;
pub const PERF_RECORD_LOST_SAMPLES: u32 = 13;

/// Feature bits (tools/perf/util/header.h `HEADER_*`).
pub const HEADER_BUILD_ID: u32 = 2;
pub const HEADER_HOSTNAME: u32 = 3;
pub const HEADER_OSRELEASE: u32 = 4;
pub const HEADER_VERSION: u32 = 5;
pub const HEADER_ARCH: u32 = 6;
pub const HEADER_NRCPUS: u32 = 7;
pub const HEADER_CMDLINE: u32 = 11;
pub const HEADER_EVENT_DESC: u32 = 12;

/// `PERF_RECORD_MISC_BUILD_ID_SIZE`: the build-id event carries its length (perf ≥ 5.10).
const PERF_RECORD_MISC_BUILD_ID_SIZE: u16 = 1 << 15;
const BUILD_ID_MAX: usize = 20;

/// Section offsets the header points at.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileSection {
    pub offset: u64,
    pub size: u64,
}

pub fn file_header(attrs: FileSection, data: FileSection, features: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FILE_HEADER_SIZE as usize);
    out.extend_from_slice(b"PERFILE2");
    put_u64(&mut out, FILE_HEADER_SIZE);
    put_u64(&mut out, FILE_ATTR_SIZE);
    for section in [attrs, data, FileSection::default()] {
        put_u64(&mut out, section.offset);
        put_u64(&mut out, section.size);
    }
    let mut bitmap = [0u64; 4];
    for &feature in features {
        bitmap[(feature / 64) as usize] |= 1 << (feature % 64);
    }
    for word in bitmap {
        put_u64(&mut out, word);
    }
    out
}

pub fn sample_type(callchains: bool) -> u64 {
    let base =
        PERF_SAMPLE_IP | PERF_SAMPLE_TID | PERF_SAMPLE_TIME | PERF_SAMPLE_CPU | PERF_SAMPLE_PERIOD;
    if callchains {
        base | PERF_SAMPLE_CALLCHAIN
    } else {
        base
    }
}

/// `perf_event_attr` for `event` sampled at `freq_hz`, guest only.
pub fn event_attr(event: SampledEvent, freq_hz: u64, callchains: bool) -> Vec<u8> {
    let (kind, config) = match event {
        SampledEvent::CpuClock => (PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK),
        SampledEvent::Cycles => (PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES),
    };
    let mut out = Vec::with_capacity(EVENT_ATTR_SIZE as usize);
    put_u32(&mut out, kind);
    put_u32(&mut out, EVENT_ATTR_SIZE as u32);
    put_u64(&mut out, config);
    put_u64(&mut out, freq_hz);
    put_u64(&mut out, sample_type(callchains));
    put_u64(&mut out, 0); // read_format
    put_u64(
        &mut out,
        ATTR_FLAG_MMAP
            | ATTR_FLAG_COMM
            | ATTR_FLAG_FREQ
            | ATTR_FLAG_SAMPLE_ID_ALL
            | ATTR_FLAG_EXCLUDE_HOST,
    );
    out.resize(EVENT_ATTR_SIZE as usize, 0);
    out
}

/// `sample_id` trailer of non-sample records (sample_id_all): the TID, TIME and CPU fields of our sample_type.
#[derive(Debug, Clone, Copy)]
pub struct SampleId {
    pub pid: u32,
    pub tid: u32,
    pub time: u64,
    pub cpu: u32,
}

fn put_sample_id(out: &mut Vec<u8>, id: &SampleId) {
    put_u32(out, id.pid);
    put_u32(out, id.tid);
    put_u64(out, id.time);
    put_u32(out, id.cpu);
    put_u32(out, 0);
}

pub struct SampleFields<'a> {
    pub misc: u16,
    pub ip: u64,
    pub id: SampleId,
    pub period: u64,
    /// Already including the context marker; `None` when the attr has no PERF_SAMPLE_CALLCHAIN.
    pub callchain: Option<&'a [u64]>,
}

pub fn sample_record(fields: &SampleFields<'_>) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + fields.callchain.map_or(0, |c| 8 * c.len()));
    put_u64(&mut body, fields.ip);
    put_u32(&mut body, fields.id.pid);
    put_u32(&mut body, fields.id.tid);
    put_u64(&mut body, fields.id.time);
    put_u32(&mut body, fields.id.cpu);
    put_u32(&mut body, 0);
    put_u64(&mut body, fields.period);
    if let Some(chain) = fields.callchain {
        put_u64(&mut body, chain.len() as u64);
        for &addr in chain {
            put_u64(&mut body, addr);
        }
    }
    record(PERF_RECORD_SAMPLE, fields.misc, body)
}

pub struct MmapFields<'a> {
    pub misc: u16,
    pub pid: u32,
    pub tid: u32,
    pub start: u64,
    pub len: u64,
    pub pgoff: u64,
    pub filename: &'a str,
    pub id: SampleId,
}

pub fn mmap_record(fields: &MmapFields<'_>) -> Vec<u8> {
    let mut body = Vec::new();
    put_u32(&mut body, fields.pid);
    put_u32(&mut body, fields.tid);
    put_u64(&mut body, fields.start);
    put_u64(&mut body, fields.len);
    put_u64(&mut body, fields.pgoff);
    put_padded_cstr(&mut body, fields.filename, 8);
    put_sample_id(&mut body, &fields.id);
    record(PERF_RECORD_MMAP, fields.misc, body)
}

pub fn comm_record(misc: u16, pid: u32, tid: u32, comm: &str, id: &SampleId) -> Vec<u8> {
    let mut body = Vec::new();
    put_u32(&mut body, pid);
    put_u32(&mut body, tid);
    put_padded_cstr(&mut body, comm, 8);
    put_sample_id(&mut body, id);
    record(PERF_RECORD_COMM, misc, body)
}

pub fn lost_samples_record(lost: u64, id: &SampleId) -> Vec<u8> {
    let mut body = Vec::new();
    put_u64(&mut body, lost);
    put_sample_id(&mut body, id);
    record(PERF_RECORD_LOST_SAMPLES, 0, body)
}

fn record(record_type: u32, misc: u16, body: Vec<u8>) -> Vec<u8> {
    let size = 8 + body.len();
    debug_assert!(size <= usize::from(u16::MAX), "caller bounds record sizes");
    let mut out = Vec::with_capacity(size);
    put_u32(&mut out, record_type);
    out.extend_from_slice(&misc.to_le_bytes());
    out.extend_from_slice(&(size as u16).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// perf's `do_write_string`: u32 length (NUL included, padded to 64), then the padded string.
pub fn feature_string(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_feature_string(&mut out, s);
    out
}

fn put_feature_string(out: &mut Vec<u8>, s: &str) {
    let padded = (s.len() + 1).next_multiple_of(64);
    put_u32(out, padded as u32);
    out.extend_from_slice(s.as_bytes());
    out.resize(out.len() + padded - s.len(), 0);
}

pub fn feature_nrcpus(available: u32, online: u32) -> Vec<u8> {
    let mut out = Vec::new();
    put_u32(&mut out, available);
    put_u32(&mut out, online);
    out
}

pub fn feature_cmdline(args: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    put_u32(&mut out, args.len() as u32);
    for arg in args {
        put_feature_string(&mut out, arg);
    }
    out
}

/// HEADER_EVENT_DESC for our one event, with no sample ids.
pub fn feature_event_desc(attr: &[u8], name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_u32(&mut out, 1);
    put_u32(&mut out, attr.len() as u32);
    out.extend_from_slice(attr);
    put_u32(&mut out, 0);
    put_feature_string(&mut out, name);
    out
}

/// One `struct build_id_event` of HEADER_BUILD_ID; returns None when the build id is longer than perf allows.
pub fn build_id_event(misc: u16, pid: u32, build_id: &[u8], filename: &str) -> Option<Vec<u8>> {
    if build_id.len() > BUILD_ID_MAX {
        return None;
    }
    let mut body = Vec::new();
    put_u32(&mut body, pid);
    let mut id_field = [0u8; 24];
    id_field[..build_id.len()].copy_from_slice(build_id);
    id_field[BUILD_ID_MAX] = build_id.len() as u8;
    body.extend_from_slice(&id_field);
    put_padded_cstr(&mut body, filename, 64);
    // The header type of build-id events is unused by perf; 0 like perf writes.
    Some(record(0, misc | PERF_RECORD_MISC_BUILD_ID_SIZE, body))
}

fn put_padded_cstr(out: &mut Vec<u8>, s: &str, align: usize) {
    let padded = (s.len() + 1).next_multiple_of(align);
    out.extend_from_slice(s.as_bytes());
    out.resize(out.len() + padded - s.len(), 0);
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_header_is_104_bytes_with_feature_bits() {
        let data = FileSection {
            offset: 248,
            size: 80,
        };
        let header = file_header(
            FileSection {
                offset: 104,
                size: FILE_ATTR_SIZE,
            },
            data,
            &[HEADER_BUILD_ID, 70],
        );
        assert_eq!(header.len() as u64, FILE_HEADER_SIZE);
        assert_eq!(&header[..8], b"PERFILE2");
        assert_eq!(u64::from_le_bytes(header[40..48].try_into().unwrap()), 248);
        assert_eq!(u64::from_le_bytes(header[48..56].try_into().unwrap()), 80);
        assert_eq!(
            u64::from_le_bytes(header[72..80].try_into().unwrap()),
            1 << HEADER_BUILD_ID
        );
        assert_eq!(
            u64::from_le_bytes(header[80..88].try_into().unwrap()),
            1 << (70 - 64)
        );
    }

    #[test]
    fn feature_strings_are_nul_terminated_and_padded_to_64() {
        let s = feature_string("x86_64");
        assert_eq!(u32::from_le_bytes(s[..4].try_into().unwrap()), 64);
        assert_eq!(s.len(), 4 + 64);
        let exact = feature_string(&"a".repeat(64));
        assert_eq!(
            u32::from_le_bytes(exact[..4].try_into().unwrap()),
            128,
            "room for the NUL"
        );
    }

    #[test]
    fn records_carry_their_size_and_8_byte_alignment() {
        let id = SampleId {
            pid: 1000,
            tid: 1000,
            time: 5,
            cpu: 1,
        };
        let comm = comm_record(5, 1000, 1000, "cr3:0x1000", &id);
        assert_eq!(
            usize::from(u16::from_le_bytes([comm[6], comm[7]])),
            comm.len()
        );
        assert_eq!(comm.len() % 8, 0);
        let chain = [1u64, 2, 3];
        let fields = SampleFields {
            misc: 4,
            ip: 7,
            id,
            period: 1,
            callchain: Some(&chain),
        };
        let sample = sample_record(&fields);
        assert_eq!(sample.len(), 8 + 8 + 8 + 8 + 8 + 8 + 8 + 24);
    }

    #[test]
    fn build_ids_longer_than_20_bytes_are_refused() {
        assert!(build_id_event(4, 0, &[0xab; 21], "[guest.kernel.kallsyms]").is_none());
        let event = build_id_event(4, 0, &[0xab; 20], "[guest.kernel.kallsyms]").unwrap();
        assert_eq!(event[8 + 4 + 20], 20, "size byte after the id");
        // perf's layout: 36-byte struct, then the name padded to 64 (not 8-aligned overall).
        assert_eq!(event.len(), 36 + 64);
        assert_eq!(
            usize::from(u16::from_le_bytes([event[6], event[7]])),
            event.len()
        );
    }
}
