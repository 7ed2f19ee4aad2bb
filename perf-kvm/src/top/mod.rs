//! `perf-kvm top`'s engine: the decaying symbol model, the ratatui screen, the `--stdio` text, and the terminal
//! guard that puts the terminal back on every way out.

pub mod model;
pub mod terminal;
pub mod text;
pub mod ui;
