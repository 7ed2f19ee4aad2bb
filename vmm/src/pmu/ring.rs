//! A perf_event ring buffer: the kernel appends records at `data_head`, we consume from `data_tail`.
//!
//! The walk over the data area is a plain function over bytes ([`drain`]), so it is tested with synthetic buffers,
//! wrap-around included; [`RingBuffer`] only adds the mapping and the head/tail protocol.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};

use perf_event_open_sys::bindings::perf_event_mmap_page;

use super::record::HEADER_SIZE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error(
        "ring buffer record at {at:#x} claims {size} bytes, with {available} left before the head"
    )]
    BadRecordSize {
        at: u64,
        size: usize,
        available: u64,
    },
    #[error(
        "ring buffer head {head:#x} is behind its tail {tail:#x}, or more than the buffer ahead"
    )]
    BadHead { head: u64, tail: u64 },
}

/// Calls `on_record` with every whole record between `tail` and `head` of the ring `data` (whose length is a power
/// of two; positions grow forever and wrap modulo the length). A record split by the end of the buffer is handed
/// over copied into one piece. Returns the new tail: `head` when every record was whole, or the error that ended the
/// walk (the caller then drops the rest by moving the tail to `head`: nothing after a bad size can be trusted).
pub fn drain(
    data: &[u8],
    tail: u64,
    head: u64,
    mut on_record: impl FnMut(&[u8]),
) -> Result<u64, RingError> {
    let len = data.len() as u64;
    debug_assert!(len.is_power_of_two());
    if head < tail || head - tail > len {
        return Err(RingError::BadHead { head, tail });
    }
    let mut pos = tail;
    let mut scratch = Vec::new();
    while pos < head {
        let available = head - pos;
        let read = |at: u64, out: &mut Vec<u8>, n: usize| {
            out.clear();
            for i in 0..n as u64 {
                out.push(data[((at + i) % len) as usize]);
            }
        };
        if available < HEADER_SIZE as u64 {
            return Err(RingError::BadRecordSize {
                at: pos,
                size: available as usize,
                available,
            });
        }
        read(pos, &mut scratch, HEADER_SIZE);
        let size = u16::from_le_bytes([scratch[6], scratch[7]]) as usize;
        if size < HEADER_SIZE || size as u64 > available {
            return Err(RingError::BadRecordSize {
                at: pos,
                size,
                available,
            });
        }
        let start = (pos % len) as usize;
        if start + size <= data.len() {
            on_record(&data[start..start + size]);
        } else {
            read(pos, &mut scratch, size);
            on_record(&scratch);
        }
        pos += size as u64;
    }
    Ok(pos)
}

/// The mapping of one event's ring buffer: a metadata page and `2^n` data pages.
pub struct RingBuffer {
    base: *mut u8,
    map_len: usize,
    data_offset: usize,
    data_len: usize,
}

// SAFETY: the mapping is owned by this value alone; the kernel is the only other party, through the head/tail
// protocol.
unsafe impl Send for RingBuffer {}

impl RingBuffer {
    /// Maps `data_pages` (a power of two) data pages of the event behind `fd`.
    pub fn map(fd: &OwnedFd, data_pages: usize) -> std::io::Result<RingBuffer> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let map_len = page * (1 + data_pages);
        // SAFETY: a fresh shared mapping of the perf fd, length as the perf_event_open ABI requires (1 + 2^n
        // pages); the kernel checks the rest.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let meta = base as *const perf_event_mmap_page;
        // SAFETY: the first page of the mapping is the kernel's perf_event_mmap_page. Kernels before 4.1 leave
        // data_offset/data_size 0; then the data area is the rest of the mapping.
        let (offset, size) = unsafe {
            (
                std::ptr::read_volatile(&(*meta).data_offset),
                std::ptr::read_volatile(&(*meta).data_size),
            )
        };
        let (data_offset, data_len) = if size == 0 {
            (page, page * data_pages)
        } else {
            (offset as usize, size as usize)
        };
        Ok(RingBuffer {
            base: base as *mut u8,
            map_len,
            data_offset,
            data_len,
        })
    }

    /// Hands every new record to `on_record` and frees their space for the kernel.
    pub fn drain(&mut self, on_record: impl FnMut(&[u8])) -> Result<(), RingError> {
        let meta = self.base as *mut perf_event_mmap_page;
        // SAFETY: `meta` points at the mapped metadata page; the kernel writes data_head, we write data_tail.
        let (head, tail) = unsafe {
            (
                std::ptr::read_volatile(&(*meta).data_head),
                std::ptr::read_volatile(&(*meta).data_tail),
            )
        };
        // Pairs with the kernel's barrier before it publishes data_head: the records below head are complete.
        fence(Ordering::Acquire);
        // SAFETY: the data area lies inside the mapping; the kernel does not write the part between tail and head
        // until we move the tail past it, and that is the only part `drain` reads.
        let data =
            unsafe { std::slice::from_raw_parts(self.base.add(self.data_offset), self.data_len) };
        let result = drain(data, tail, head, on_record);
        // Done reading before the kernel may reuse the space.
        fence(Ordering::Release);
        // SAFETY: as above; data_tail is ours to write. On an error the rest is dropped (tail = head).
        unsafe { std::ptr::write_volatile(&mut (*meta).data_tail, head) };
        result.map(|_| ())
    }
}

impl Drop for RingBuffer {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping `map` made; nothing refers to it after drop.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::super::record::tests::{record, sample_record};
    use super::super::record::{parse_record, PmuRecord, PERF_RECORD_MISC_GUEST_KERNEL};
    use super::*;

    /// Writes `bytes` into the ring `data` at stream position `pos`, wrapping as the kernel does.
    fn put(data: &mut [u8], pos: u64, bytes: &[u8]) {
        let len = data.len() as u64;
        for (i, &b) in bytes.iter().enumerate() {
            data[((pos + i as u64) % len) as usize] = b;
        }
    }

    fn collect(data: &[u8], tail: u64, head: u64) -> (Result<u64, RingError>, Vec<PmuRecord>) {
        let mut out = Vec::new();
        let r = drain(data, tail, head, |rec| out.push(parse_record(rec).unwrap()));
        (r, out)
    }

    #[test]
    fn records_are_read_in_order_including_one_split_by_the_wrap() {
        let mut data = vec![0u8; 128];
        // Start near the end so the second sample (40 bytes) straddles the wrap at 128.
        let tail = 3 * 128 + 64;
        let a = sample_record(PERF_RECORD_MISC_GUEST_KERNEL, 0xa, 10, 1, 100);
        let b = sample_record(PERF_RECORD_MISC_GUEST_KERNEL, 0xb, 11, 2, 200);
        let c = record(200, 0, &[7; 16]);
        put(&mut data, tail, &a);
        put(&mut data, tail + 40, &b);
        put(&mut data, tail + 80, &c);
        let head = tail + 80 + 24;
        let (r, recs) = collect(&data, tail, head);
        assert_eq!(r, Ok(head));
        assert_eq!(recs.len(), 3);
        let ips: Vec<u64> = recs
            .iter()
            .filter_map(|r| match r {
                PmuRecord::Sample(s) => Some(s.ip),
                _ => None,
            })
            .collect();
        assert_eq!(ips, vec![0xa, 0xb]);
        assert_eq!(recs[2], PmuRecord::Other(200));
    }

    #[test]
    fn empty_ring_and_bad_sizes() {
        let mut data = vec![0u8; 64];
        assert_eq!(collect(&data, 40, 40), (Ok(40), vec![]));
        // A zero size would loop forever; a size past the head reads garbage: both stop the walk.
        put(&mut data, 0, &record(9, 0, &[]));
        data[6] = 0;
        assert!(matches!(
            collect(&data, 0, 16).0,
            Err(RingError::BadRecordSize { size: 0, .. })
        ));
        put(&mut data, 0, &record(9, 0, &[0; 32]));
        assert!(matches!(
            collect(&data, 0, 16).0,
            Err(RingError::BadRecordSize { size: 40, .. })
        ));
        assert_eq!(
            collect(&data, 100, 20).0,
            Err(RingError::BadHead {
                head: 20,
                tail: 100
            })
        );
        assert!(collect(&data, 0, 65).0.is_err());
    }
}
