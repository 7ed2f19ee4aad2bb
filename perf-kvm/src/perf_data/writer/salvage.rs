//! Closing a perf.data file whose writing failed (disk full, a file size limit): the records that reached the
//! disk are kept, a torn last record is cut off, and the feature sections and the final header are written over
//! what is there, so the file is as complete and valid as a finished one.

use std::os::unix::fs::FileExt;

use super::{feature_tail, file_header, PerfDataError, PerfDataWriter};
use crate::perf_data::encode::PERF_RECORD_SAMPLE;

/// What a salvaged file holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Salvaged {
    /// Sample records in the file.
    pub samples: u64,
    /// Complete sample records that were on disk but had to go to make room for the feature sections.
    pub dropped_samples: u64,
    /// Whether the feature sections and the final header made it; if not, the header still covers every kept
    /// record and the file reads as an unfinished one (see docs/perf-data.md).
    pub finished: bool,
}

impl std::fmt::Display for Salvaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the file keeps the {} samples written before",
            self.samples
        )?;
        if self.dropped_samples > 0 {
            write!(
                f,
                " ({} more were dropped to make room for the header's feature sections)",
                self.dropped_samples
            )?;
        }
        if self.finished {
            write!(f, " and is complete")
        } else {
            write!(f, " and reads as an unfinished file")
        }
    }
}

impl PerfDataWriter {
    /// After a write error (`cause`), closes the file over the records already on disk; the buffered rest is
    /// dropped. Returns [`PerfDataError::Salvaged`] saying what the file keeps, or `cause` when even that failed.
    pub fn salvage(self, cause: PerfDataError) -> PerfDataError {
        let PerfDataError::Write { path, source } = cause else {
            return cause;
        };
        match self.close_over_disk() {
            Ok(kept) => PerfDataError::Salvaged { path, kept, source },
            Err(_) => PerfDataError::Write { path, source },
        }
    }

    fn close_over_disk(self) -> std::io::Result<Salvaged> {
        let features = self.feature_sections();
        let tail_len = feature_tail(&features, 0).0.len() as u64;
        let (data_offset, flushed) = (self.data_offset, self.flushed);
        // Neither flush nor write what is still buffered: the disk has no room for it.
        let (file, _unwritten) = self.out.into_parts();
        let len = file.metadata()?.len();
        // Records up to the last flush are complete; walk the ones that reached the disk after it.
        let start = data_offset + flushed.data_size;
        let mut bytes = vec![0u8; len.saturating_sub(start) as usize];
        file.read_exact_at(&mut bytes, start)?;
        let boundaries = record_boundaries(&bytes);
        let &(last_end, samples_on_disk) = boundaries.last().expect("the start is a boundary");
        // Feature sections go right after the last complete record; if the disk refuses that, after the last
        // record that leaves room for them inside what the file already occupies.
        let roomy = boundaries
            .iter()
            .rev()
            .find(|&&(end, _)| start + end + tail_len <= len);
        for &(end, samples) in std::iter::once(&(last_end, samples_on_disk)).chain(roomy) {
            let data_size = flushed.data_size + end;
            let (tail, ids) = feature_tail(&features, data_offset + data_size);
            if file.write_all_at(&tail, data_offset + data_size).is_err() {
                continue;
            }
            file.set_len(data_offset + data_size + tail_len)?;
            file.write_all_at(&file_header(data_offset, data_size, &ids), 0)?;
            file.sync_all()?;
            return Ok(Salvaged {
                samples: flushed.samples + samples,
                dropped_samples: samples_on_disk - samples,
                finished: true,
            });
        }
        // No room even for the features: a header over every complete record, without features.
        let data_size = flushed.data_size + last_end;
        file.set_len(data_offset + data_size)?;
        file.write_all_at(&file_header(data_offset, data_size, &[]), 0)?;
        file.sync_all()?;
        Ok(Salvaged {
            samples: flushed.samples + samples_on_disk,
            dropped_samples: 0,
            finished: false,
        })
    }
}

/// `(end offset, sample records before it)` for every complete record in `bytes`, starting with `(0, 0)`; a torn
/// record at the end is not counted.
fn record_boundaries(bytes: &[u8]) -> Vec<(u64, u64)> {
    let mut out = vec![(0u64, 0u64)];
    let (mut at, mut samples) = (0usize, 0u64);
    while at + 8 <= bytes.len() {
        let kind = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let size = usize::from(u16::from_le_bytes([bytes[at + 6], bytes[at + 7]]));
        if size < 8 || at + size > bytes.len() {
            break;
        }
        at += size;
        if kind == PERF_RECORD_SAMPLE {
            samples += 1;
        }
        out.push((at as u64, samples));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u32, size: u16) -> Vec<u8> {
        let mut r = vec![0u8; usize::from(size)];
        r[..4].copy_from_slice(&kind.to_le_bytes());
        r[6..8].copy_from_slice(&size.to_le_bytes());
        r
    }

    #[test]
    fn boundaries_stop_at_a_torn_record() {
        let mut bytes = record(PERF_RECORD_SAMPLE, 16);
        bytes.extend(record(3, 24));
        bytes.extend(record(PERF_RECORD_SAMPLE, 32));
        bytes.extend(&record(PERF_RECORD_SAMPLE, 40)[..20]);
        assert_eq!(
            record_boundaries(&bytes),
            vec![(0, 0), (16, 1), (40, 1), (72, 2)]
        );
    }

    #[test]
    fn a_zero_size_record_ends_the_walk() {
        let mut bytes = record(PERF_RECORD_SAMPLE, 16);
        bytes.extend([0u8; 16]);
        assert_eq!(record_boundaries(&bytes), vec![(0, 0), (16, 1)]);
    }
}
