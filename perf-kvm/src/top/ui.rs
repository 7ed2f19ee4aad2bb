//! The ratatui screen of `top`: header, hottest-symbol table (or the callers of one), exit-rate panel with a
//! sparkline, and a status line of key hints. Key handling lives here too; it never blocks.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Sparkline, Table, TableState, Wrap};
use ratatui::Frame;

use super::model::{SymbolId, TopModel, TopRow, TopSort, VcpuView};
use super::text;

/// Smallest screen the full layout fits on; below it a short notice is drawn instead.
pub const MIN_WIDTH: u16 = 40;
pub const MIN_HEIGHT: u16 = 12;

/// What the keys changed; the screen is drawn from this plus the model.
pub struct UiState {
    pub view: VcpuView,
    pub sort: TopSort,
    pub filter: String,
    /// `Some` while the `/` prompt is open: the text typed so far.
    pub editing: Option<String>,
    pub selected: usize,
    /// `Some(symbol)` while the callers view is shown.
    pub callers_of: Option<SymbolId>,
    pub paused: bool,
    /// The rows shown when `p` was pressed.
    frozen: Option<Vec<TopRow>>,
    /// Shown in the status line until the next key: the VM's end, errors.
    pub notice: Option<String>,
    pub freq_hz: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum KeyOutcome {
    Continue,
    Quit,
}

impl UiState {
    pub fn new(freq_hz: u32) -> UiState {
        UiState {
            view: VcpuView::All,
            sort: TopSort::Overhead,
            filter: String::new(),
            editing: None,
            selected: 0,
            callers_of: None,
            paused: false,
            frozen: None,
            notice: None,
            freq_hz,
        }
    }

    /// The rows of the main table as they are to be shown now.
    pub fn rows(&self, model: &TopModel) -> Vec<TopRow> {
        match &self.frozen {
            Some(rows) => rows.clone(),
            None => model.rows(self.view, &self.filter, self.sort),
        }
    }

    pub fn handle_key(&mut self, key: KeyEvent, model: &mut TopModel) -> KeyOutcome {
        if key.kind == KeyEventKind::Release {
            return KeyOutcome::Continue;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return KeyOutcome::Quit;
        }
        if let Some(text) = &mut self.editing {
            match key.code {
                KeyCode::Enter => {
                    self.filter = std::mem::take(text);
                    self.editing = None;
                    self.selected = 0;
                    self.refreeze(model);
                }
                KeyCode::Esc => self.editing = None,
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char(c) if !c.is_control() && text.len() < 64 => text.push(c),
                _ => {}
            }
            return KeyOutcome::Continue;
        }
        match key.code {
            KeyCode::Char('q') => return KeyOutcome::Quit,
            KeyCode::Esc if self.callers_of.is_some() => self.callers_of = None,
            KeyCode::Esc => return KeyOutcome::Quit,
            KeyCode::Char('p') => {
                self.paused = !self.paused;
                self.frozen = None;
                self.refreeze(model);
            }
            KeyCode::Char('v') => {
                let n = model.vcpu_count();
                self.view = match self.view {
                    VcpuView::All if n > 0 => VcpuView::One(0),
                    VcpuView::One(v) if v + 1 < n => VcpuView::One(v + 1),
                    _ => VcpuView::All,
                };
                self.selected = 0;
                self.refreeze(model);
            }
            KeyCode::Char('s') => {
                self.sort = self.sort.next();
                self.refreeze(model);
            }
            KeyCode::Char('/') => self.editing = Some(self.filter.clone()),
            KeyCode::Char('z') => {
                model.zero();
                self.selected = 0;
                self.refreeze(model);
            }
            KeyCode::Enter if self.callers_of.is_some() => self.callers_of = None,
            KeyCode::Enter => {
                self.callers_of = self.rows(model).get(self.selected).map(|r| r.symbol);
            }
            KeyCode::Down | KeyCode::Char('j') => self.selected = self.selected.saturating_add(1),
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::PageDown => self.selected = self.selected.saturating_add(10),
            KeyCode::PageUp => self.selected = self.selected.saturating_sub(10),
            _ => {}
        }
        KeyOutcome::Continue
    }

    fn refreeze(&mut self, model: &TopModel) {
        self.frozen = None;
        if self.paused {
            self.frozen = Some(model.rows(self.view, &self.filter, self.sort));
        }
    }
}

pub fn draw(frame: &mut Frame, model: &TopModel, ui: &mut UiState) {
    let area = frame.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        let msg = format!(
            "perf-kvm top: terminal too small ({}x{}); needs {MIN_WIDTH}x{MIN_HEIGHT}. q quits.",
            area.width, area.height
        );
        frame.render_widget(Paragraph::new(msg).wrap(Wrap { trim: true }), area);
        return;
    }
    let [header, body, exits, status] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(4),
        Constraint::Length(5),
        Constraint::Length(1),
    ])
    .areas(area);
    let h = model.header(ui.view);
    let mut head = text::header_line(&h, ui.freq_hz, ui.view, model.vcpu_count());
    if ui.paused {
        head.push_str("  [PAUSED]");
    }
    frame.render_widget(
        Paragraph::new(head).style(Style::new().add_modifier(Modifier::BOLD)),
        header,
    );
    match ui.callers_of {
        Some(sym) => draw_callers(frame, body, model, ui, sym),
        None => draw_symbols(frame, body, model, ui),
    }
    draw_exits(frame, exits, model);
    let status_text = if let Some(t) = &ui.editing {
        format!("Filter symbols: {t}▏  (Enter apply, Esc cancel)")
    } else if let Some(n) = &ui.notice {
        format!("{n}  | q quit")
    } else {
        format!(
            "q quit  p pause  v vCPU  s sort ({})  / filter{}  Enter callers  z zero",
            ui.sort.label(),
            if ui.filter.is_empty() {
                String::new()
            } else {
                format!(" [{}]", ui.filter)
            }
        )
    };
    frame.render_widget(
        Paragraph::new(status_text).style(Style::new().add_modifier(Modifier::REVERSED)),
        status,
    );
}

fn symbol_table<'a>(rows: &[TopRow], title: String) -> Table<'a> {
    let body: Vec<Row> = rows
        .iter()
        .map(|r| {
            Row::new(vec![
                Cell::from(format!("{:>7.2}%", r.overhead)),
                Cell::from(format!("{:>8}", r.samples)),
                Cell::from(r.info.object.clone()),
                Cell::from(format!("{} {}", text::mode_tag(r.info.mode), r.info.name)),
            ])
        })
        .collect();
    // The object column fits the longest name, within reason.
    let object_width = rows
        .iter()
        .map(|r| r.info.object.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(13, 32) as u16;
    Table::new(
        body,
        [
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(object_width),
            Constraint::Min(10),
        ],
    )
    .header(
        Row::new(vec!["Overhead", " Samples", "Shared Object", "Symbol"])
            .style(Style::new().add_modifier(Modifier::UNDERLINED)),
    )
    .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
    .block(Block::new().borders(Borders::TOP).title(title))
}

fn draw_symbols(frame: &mut Frame, area: Rect, model: &TopModel, ui: &mut UiState) {
    let rows = ui.rows(model);
    ui.selected = ui.selected.min(rows.len().saturating_sub(1));
    let title = format!(
        " Hottest guest symbols, {} ",
        text::view_label(ui.view, model.vcpu_count())
    );
    let mut state = TableState::default().with_selected(if rows.is_empty() {
        None
    } else {
        Some(ui.selected)
    });
    frame.render_stateful_widget(symbol_table(&rows, title), area, &mut state);
    if rows.is_empty() {
        let msg = if ui.filter.is_empty() {
            "(no samples yet)"
        } else {
            "(no symbol matches the filter)"
        };
        let inner = Rect {
            y: area.y + 2,
            height: area.height.saturating_sub(2),
            ..area
        };
        frame.render_widget(Paragraph::new(msg), inner);
    }
}

fn draw_callers(frame: &mut Frame, area: Rect, model: &TopModel, ui: &UiState, sym: SymbolId) {
    let name = &model.symbol(sym).name;
    if !model.has_callchains {
        let msg = format!(
            "Callers of {name}: no call chains were recorded. Restart with -g to see callers.\n(Enter or Esc: back)"
        );
        frame.render_widget(
            Paragraph::new(msg)
                .wrap(Wrap { trim: true })
                .block(Block::new().borders(Borders::TOP)),
            area,
        );
        return;
    }
    let rows = model.callers(sym, ui.view);
    let title = format!(" Callers of {name} (Enter or Esc: back) ");
    frame.render_widget(symbol_table(&rows, title), area);
    if rows.is_empty() {
        let inner = Rect {
            y: area.y + 2,
            height: area.height.saturating_sub(2),
            ..area
        };
        frame.render_widget(Paragraph::new("(no callers in the window)"), inner);
    }
}

fn draw_exits(frame: &mut Frame, area: Rect, model: &TopModel) {
    let rates = model.exit_rates();
    let last = rates.last().copied().unwrap_or(0);
    let reasons: Vec<String> = model
        .exit_reasons()
        .iter()
        .take(3)
        .map(|(n, r)| format!("{n} {r}/s"))
        .collect();
    let title = format!(" VM exits: {last}/s  {} ", reasons.join("  "));
    let width = area.width.saturating_sub(2) as usize;
    let shown = &rates[rates.len().saturating_sub(width)..];
    let spark = Sparkline::default()
        .data(shown.iter().copied())
        .block(Block::new().borders(Borders::ALL).title(Line::from(title)));
    frame.render_widget(spark, area);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::backend::TestBackend;
    use ratatui::crossterm::event::KeyEvent;
    use ratatui::Terminal;
    use vmm::{GuestMode, Sample};

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn model() -> TopModel {
        let mut m = TopModel::new(None, 2).unwrap();
        for (vcpu, rip, n) in [(0u32, 0x1000u64, 3), (1, 0x2000, 1)] {
            for _ in 0..n {
                let s = Sample {
                    time_ns: 0,
                    vcpu,
                    rip,
                    mode: GuestMode::User,
                    cr3: 0,
                    callchain: vec![0x3001],
                    period: None,
                };
                m.add(&s);
            }
        }
        m
    }

    fn screen(model: &TopModel, ui: &mut UiState, w: u16, h: u16) -> String {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, model, ui)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..h)
            .map(|y| {
                (0..w)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
                    + "\n"
            })
            .collect()
    }

    #[test]
    fn keys_cycle_vcpus_filter_open_callers_pause_and_quit() {
        let mut m = model();
        let mut ui = UiState::new(1000);
        ui.handle_key(key(KeyCode::Char('v')), &mut m);
        assert_eq!(ui.view, VcpuView::One(0));
        ui.handle_key(key(KeyCode::Char('v')), &mut m);
        ui.handle_key(key(KeyCode::Char('v')), &mut m);
        assert_eq!(ui.view, VcpuView::All);
        ui.handle_key(key(KeyCode::Char('/')), &mut m);
        for c in "2000q".chars() {
            // While the prompt is open, `q` is text, not quit.
            assert_eq!(
                ui.handle_key(key(KeyCode::Char(c)), &mut m),
                KeyOutcome::Continue
            );
        }
        ui.handle_key(key(KeyCode::Backspace), &mut m);
        ui.handle_key(key(KeyCode::Enter), &mut m);
        assert_eq!(ui.filter, "2000");
        let rows = ui.rows(&m);
        assert_eq!(rows.len(), 1);
        ui.handle_key(key(KeyCode::Enter), &mut m);
        assert_eq!(ui.callers_of, Some(rows[0].symbol));
        ui.handle_key(key(KeyCode::Esc), &mut m);
        assert_eq!(ui.callers_of, None);
        ui.handle_key(key(KeyCode::Char('s')), &mut m);
        assert_eq!(ui.sort, TopSort::Samples);
        ui.handle_key(key(KeyCode::Char('p')), &mut m);
        let frozen = ui.rows(&m);
        m.add(&Sample {
            time_ns: 0,
            vcpu: 0,
            rip: 0x2000,
            mode: GuestMode::User,
            cr3: 0,
            callchain: vec![],
            period: None,
        });
        assert_eq!(ui.rows(&m), frozen, "paused rows stay");
        ui.handle_key(key(KeyCode::Char('p')), &mut m);
        assert_ne!(ui.rows(&m), frozen);
        ui.handle_key(key(KeyCode::Char('z')), &mut m);
        assert!(ui.rows(&m).is_empty());
        assert_eq!(
            ui.handle_key(
                KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL),
                &mut m
            ),
            KeyOutcome::Quit
        );
        assert_eq!(
            ui.handle_key(key(KeyCode::Char('q')), &mut m),
            KeyOutcome::Quit
        );
    }

    #[test]
    fn draws_the_layout_or_a_notice_on_tiny_terminals() {
        let m = model();
        let mut ui = UiState::new(1000);
        let text = screen(&m, &mut ui, 100, 20);
        assert!(
            text.contains("PerfKvmTop:") && text.contains("guest user: 100.0%"),
            "{text}"
        );
        assert!(
            text.contains("0x0000000000001000") && text.contains("VM exits:"),
            "{text}"
        );
        assert!(text.contains("q quit  p pause  v vCPU"), "{text}");
        for (w, h) in [(20, 5), (1, 1), (39, 30), (100, 11)] {
            let text = screen(&m, &mut ui, w, h);
            assert!(
                text.replace('\n', "").contains("too") || w * h < 10,
                "{w}x{h}: {text}"
            );
        }
        ui.callers_of = Some(ui.rows(&m)[0].symbol);
        let text = screen(&m, &mut ui, 100, 20);
        assert!(text.contains("Callers of 0x0000000000001000"), "{text}");
        assert!(text.contains("0x0000000000003000"), "{text}");
    }
}
