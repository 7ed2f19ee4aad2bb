//! Text output in the format of binutils `addr2line -a -f -i -p`, so the two can be compared line by line.

use std::fmt::Write;

use crate::Symbolized;

#[derive(Debug, Clone, Copy, Default)]
pub struct Addr2lineStyle {
    /// `-i`: print the inlined-by chain, not just the innermost frame.
    pub inlines: bool,
    /// `-f`: print function names.
    pub functions: bool,
    /// `-a`: print the address first.
    pub addresses: bool,
    /// `-p`: one line per frame (`func at file:line`) instead of function and location on separate lines.
    pub pretty: bool,
}

impl Addr2lineStyle {
    /// `-a -f -i -p`.
    pub const AFIP: Addr2lineStyle = Addr2lineStyle {
        inlines: true,
        functions: true,
        addresses: true,
        pretty: true,
    };
}

/// The text binutils `addr2line` prints for one address (ending in a newline).
pub fn format_addr2line(result: &Symbolized, style: Addr2lineStyle) -> String {
    let mut out = String::new();
    if style.addresses {
        // binutils pads to the target's address width: 16 hex digits for a 64-bit ELF.
        let _ = write!(out, "0x{:016x}", result.addr);
        out.push_str(if style.pretty { ": " } else { "\n" });
    }
    if result.frames.is_empty() {
        if style.functions {
            out.push_str(if style.pretty { "?? " } else { "??\n" });
        }
        out.push_str("??:0\n");
        return out;
    }
    let shown = if style.inlines {
        result.frames.len()
    } else {
        1
    };
    for (index, frame) in result.frames.iter().take(shown).enumerate() {
        if index > 0 && style.pretty {
            out.push_str(" (inlined by) ");
        }
        if style.functions {
            out.push_str(
                frame
                    .function
                    .as_deref()
                    .filter(|f| !f.is_empty())
                    .unwrap_or("??"),
            );
            out.push_str(if style.pretty { " at " } else { "\n" });
        }
        out.push_str(frame.file.as_deref().unwrap_or("??"));
        out.push(':');
        // binutils keeps the innermost row's discriminator for every inlined-by line, so repeat it.
        match (frame.line, result.frames[0].discriminator) {
            (Some(line), Some(discriminator)) if line != 0 => {
                let _ = writeln!(out, "{line} (discriminator {discriminator})");
            }
            (Some(line), None) if line != 0 => {
                let _ = writeln!(out, "{line}");
            }
            _ => out.push_str("?\n"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Frame;

    fn frame(function: &str, file: Option<&str>, line: Option<u32>, inlined: bool) -> Frame {
        Frame {
            function: Some(function.into()),
            symbol_offset: None,
            file: file.map(Into::into),
            line,
            column: None,
            discriminator: None,
            inlined,
        }
    }

    #[test]
    fn formats_like_binutils() {
        let unknown = Symbolized {
            addr: 0x10,
            frames: vec![],
            object: None,
        };
        assert_eq!(
            format_addr2line(&unknown, Addr2lineStyle::AFIP),
            "0x0000000000000010: ?? ??:0\n"
        );
        let symbol_only = Symbolized {
            addr: 0x1000,
            frames: vec![frame("_init", None, None, false)],
            object: None,
        };
        assert_eq!(
            format_addr2line(&symbol_only, Addr2lineStyle::AFIP),
            "0x0000000000001000: _init at ??:?\n"
        );
        let inlined = Symbolized {
            addr: 0x1154,
            frames: vec![
                frame("sq", Some("/t.c"), Some(1), true),
                frame("work", Some("/t.c"), Some(3), false),
            ],
            object: None,
        };
        assert_eq!(
            format_addr2line(&inlined, Addr2lineStyle::AFIP),
            "0x0000000000001154: sq at /t.c:1\n (inlined by) work at /t.c:3\n"
        );
    }
}
