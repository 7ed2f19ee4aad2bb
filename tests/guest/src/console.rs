//! COM1 output and a tiny integer formatter (no `core::fmt`: its precompiled code may use SSE, which KVM's
//! instruction emulator rejects at CPL0 on PVM hosts).

use crate::arch::{inb, outb, pause};
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
static LOCK: AtomicBool = AtomicBool::new(false);

/// Programs COM1 for 115200 8N1, no interrupts, FIFO on (7 port writes).
pub fn init() {
    outb(COM1 + 1, 0x00); // IER: no interrupts
    outb(COM1 + 3, 0x80); // LCR: DLAB
    outb(COM1, 0x01); // divisor low: 115200
    outb(COM1 + 1, 0x00); // divisor high
    outb(COM1 + 3, 0x03); // LCR: 8N1
    outb(COM1 + 2, 0xc7); // FCR: FIFO on, cleared
    outb(COM1 + 4, 0x03); // MCR: DTR | RTS
}

fn putc(c: u8) {
    // Wait for THR empty (bounded: an absent UART reads 0xff, which says "empty").
    let mut n = 0;
    while inb(COM1 + 5) & 0x20 == 0 && n < 100_000 {
        pause();
        n += 1;
    }
    outb(COM1, c);
}

/// Writes raw bytes under the console lock: one `out` per byte.
pub fn write_bytes(b: &[u8]) {
    lock();
    for &c in b {
        putc(c);
    }
    unlock();
}

fn lock() {
    // Bounded: an exception handler may print while this CPU (or a dead one) holds the lock.
    let mut n = 0u32;
    while LOCK.swap(true, Ordering::Acquire) {
        n += 1;
        if n > 2_000_000 {
            break;
        }
        pause();
    }
}

fn unlock() {
    LOCK.store(false, Ordering::Release);
}

/// One output line, built with integer formatting only.
pub struct Line {
    buf: [u8; 240],
    len: usize,
}

impl Line {
    pub fn new() -> Line {
        Line {
            buf: [0; 240],
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn byte(&mut self, c: u8) -> &mut Line {
        if self.len < self.buf.len() {
            self.buf[self.len] = c;
            self.len += 1;
        }
        self
    }

    pub fn bytes(&mut self, s: &[u8]) -> &mut Line {
        for &c in s {
            self.byte(c);
        }
        self
    }

    pub fn s(&mut self, s: &str) -> &mut Line {
        self.bytes(s.as_bytes())
    }

    pub fn dec(&mut self, mut v: u64) -> &mut Line {
        let mut tmp = [0u8; 20];
        let mut i = 0;
        loop {
            tmp[i] = b'0' + (v % 10) as u8;
            i += 1;
            v /= 10;
            if v == 0 || i == tmp.len() {
                break;
            }
        }
        while i > 0 {
            i -= 1;
            self.byte(tmp[i]);
        }
        self
    }

    pub fn hex(&mut self, v: u64) -> &mut Line {
        self.s("0x");
        let mut started = false;
        for i in (0..16).rev() {
            let d = ((v >> (i * 4)) & 0xf) as u8;
            if d != 0 || started || i == 0 {
                started = true;
                self.byte(if d < 10 { b'0' + d } else { b'a' + d - 10 });
            }
        }
        self
    }

    /// `part / whole` as a percentage with one decimal ("60.2"), rounded to nearest.
    pub fn pct(&mut self, part: u64, whole: u64) -> &mut Line {
        // u64 only (u128 division would call into compiler_builtins).
        let (mut p, mut w) = (part, whole);
        while p > u64::MAX / 2000 || w > u64::MAX / 2 {
            p >>= 1;
            w >>= 1;
        }
        let permille = (p * 1000 + w / 2).checked_div(w).unwrap_or(0);
        self.dec(permille / 10).byte(b'.').dec(permille % 10)
    }

    /// Prints the line and a newline.
    pub fn print(&mut self) {
        self.byte(b'\n');
        write_bytes(&self.buf[..self.len]);
    }
}

/// Prints a string as one line.
pub fn println(s: &str) {
    Line::new().s(s).print();
}
