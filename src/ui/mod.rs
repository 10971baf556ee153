//! What the operator sees. Data goes to stdout (human text or `--output json`);
//! progress goes to stderr: a spinner with elapsed time on a terminal, plain
//! timestamped lines otherwise (CI logs, pipes), nothing with `--output json`
//! unless verbose.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Text for people.
    Human,
    /// One JSON document on stdout (schemas in README.md).
    Json,
}

#[derive(Debug, Clone)]
pub struct Ui {
    pub format: OutputFormat,
    /// stderr is a terminal: draw spinners.
    interactive: bool,
    /// `NO_COLOR` unset and stderr is a terminal.
    color: bool,
}

impl Ui {
    pub fn new(format: OutputFormat) -> Ui {
        let interactive = std::io::stderr().is_terminal();
        let color = interactive && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        Ui {
            format,
            interactive,
            color,
        }
    }

    pub fn json(&self) -> bool {
        self.format == OutputFormat::Json
    }

    /// Prints a value as pretty JSON on stdout.
    pub fn print_json<T: Serialize>(&self, value: &T) {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("output types serialize")
        );
    }

    /// A progress note on stderr (suppressed under `--output json`).
    pub fn note(&self, msg: impl AsRef<str>) {
        if !self.json() {
            eprintln!("{}", msg.as_ref());
        }
    }

    /// Starts a long step. Finish it with [`Step::done`] or [`Step::fail`];
    /// dropping it unfinished clears the spinner.
    pub fn step(&self, msg: impl Into<String>) -> Step {
        let msg = msg.into();
        let started = Instant::now();
        let bar = if self.interactive && !self.json() {
            let bar = ProgressBar::new_spinner();
            let style = if self.color {
                "{spinner:.cyan} {msg} [{elapsed}]"
            } else {
                "{spinner} {msg} [{elapsed}]"
            };
            bar.set_style(ProgressStyle::with_template(style).expect("static progress template"));
            bar.set_message(msg.clone());
            bar.enable_steady_tick(Duration::from_millis(120));
            Some(bar)
        } else {
            if !self.json() {
                eprintln!("{msg} ...");
            }
            None
        };
        Step {
            msg,
            started,
            bar,
            quiet: self.json(),
        }
    }
}

pub struct Step {
    msg: String,
    started: Instant,
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Step {
    /// Updates what the step is waiting on (shown beside the spinner, or as a line).
    pub fn update(&self, detail: impl AsRef<str>) {
        match &self.bar {
            Some(bar) => bar.set_message(format!("{}: {}", self.msg, detail.as_ref())),
            None if !self.quiet => eprintln!("  {}: {}", self.msg, detail.as_ref()),
            None => {}
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn done(self, result: impl AsRef<str>) -> Duration {
        self.finish("ok", result.as_ref())
    }

    pub fn fail(self, why: impl AsRef<str>) -> Duration {
        self.finish("FAILED", why.as_ref())
    }

    fn finish(mut self, status: &str, detail: &str) -> Duration {
        let elapsed = self.started.elapsed();
        let line = if detail.is_empty() {
            format!("{}: {status} ({})", self.msg, fmt_duration(elapsed))
        } else {
            format!(
                "{}: {status}, {detail} ({})",
                self.msg,
                fmt_duration(elapsed)
            )
        };
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if !self.quiet {
            eprintln!("{line}");
        }
        elapsed
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// `1.2s`, `3m04s`: short and unambiguous.
pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let s = d.as_secs();
        format!("{}m{:02}s", s / 60, s % 60)
    }
}
