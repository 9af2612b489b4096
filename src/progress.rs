//! Progress for long work: bars on a terminal, nothing when quiet, JSON lines for
//! scripts.

use std::io::Write;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bars,
    Quiet,
    JsonLines,
}

pub struct Progress {
    mode: Mode,
    multi: MultiProgress,
    out: Mutex<()>,
    /// Every byte bar made, for a caller that shows them its own way (the
    /// station's page).
    made: Mutex<Vec<ProgressBar>>,
}

/// Where one bar stands.
#[derive(Debug, Clone)]
pub struct BarState {
    pub label: String,
    pub position: u64,
    pub length: Option<u64>,
    pub message: String,
    pub per_sec: f64,
}

impl Progress {
    pub fn new(mode: Mode) -> Self {
        let target = if mode == Mode::Bars {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            mode,
            multi: MultiProgress::with_draw_target(target),
            out: Mutex::new(()),
            made: Mutex::new(Vec::new()),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// A byte-counting bar (hidden unless drawing bars).
    pub fn bytes(&self, label: &str, total: u64) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>14} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        self.made
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(bar.clone());
        bar
    }

    /// A bar that counts percent, for work whose bytes are counted elsewhere
    /// (a station's card, written by its own flash).
    pub fn percent(&self, label: &str) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(100));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>24} [{bar:30}] {pos:>3} % {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        bar
    }

    /// The bar labelled `label` made last, where it stands.
    pub fn bar(&self, label: &str) -> Option<BarState> {
        let made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        made.iter()
            .rev()
            .find(|b| b.prefix() == label)
            .map(|b| BarState {
                label: b.prefix(),
                position: b.position(),
                length: b.length(),
                message: b.message(),
                per_sec: b.per_sec(),
            })
    }

    /// One JSON line on stdout (JSON mode only).
    pub fn event<T: Serialize>(&self, event: &T) {
        if self.mode == Mode::JsonLines {
            let _guard = self.out.lock();
            let mut stdout = std::io::stdout().lock();
            let _ = serde_json::to_writer(&mut stdout, event);
            let _ = writeln!(stdout);
        }
    }

    /// A warning: on stderr in every mode (above the bars when drawing them),
    /// and as a `warning` event in JSON mode.
    pub fn warn(&self, line: &str) {
        self.event(&serde_json::json!({"event": "warning", "message": line}));
        if self.mode == Mode::Bars {
            self.multi.suspend(|| eprintln!("{line}"));
        } else {
            eprintln!("{line}");
        }
    }

    /// A line for people (bars mode), printed above the bars.
    pub fn say(&self, line: &str) {
        if self.mode == Mode::Bars {
            let _ = self.multi.println(line);
        }
    }
}
