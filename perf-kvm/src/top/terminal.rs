//! Raw mode and the alternate screen, undone on drop, on panic (ratatui's hook) and therefore on every return path.

use std::io::IsTerminal;

use ratatui::DefaultTerminal;

#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error(
        "perf-kvm top needs a terminal: {0} is not one. Use --stdio for periodic text tables, or run it in a terminal"
    )]
    NotATerminal(&'static str),
    #[error("cannot set up the terminal")]
    Setup(#[source] std::io::Error),
}

/// Owns the terminal while the TUI runs.
pub struct TerminalGuard {
    pub terminal: DefaultTerminal,
}

impl TerminalGuard {
    /// Checks that stdin and stdout are terminals, then enters raw mode and the alternate screen.
    pub fn enter() -> Result<TerminalGuard, TerminalError> {
        if !std::io::stdout().is_terminal() {
            return Err(TerminalError::NotATerminal("standard output"));
        }
        if !std::io::stdin().is_terminal() {
            return Err(TerminalError::NotATerminal("standard input"));
        }
        let terminal = ratatui::try_init().map_err(|e| {
            ratatui::restore();
            TerminalError::Setup(e)
        })?;
        Ok(TerminalGuard { terminal })
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let _ = self.terminal.show_cursor();
        ratatui::restore();
    }
}
