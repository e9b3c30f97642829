//! Recent log lines kept in memory for operators (`GET /logs`), beside the normal
//! stderr output and independent of its verbosity.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use utoipa::ToSchema;

/// Lines kept; older ones are dropped.
const CAPACITY: usize = 500;

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LogLine {
    pub at: DateTime<Utc>,
    pub level: String,
    pub target: String,
    /// The message and its fields, as `message key=value ...`.
    pub message: String,
}

fn buffer() -> &'static Mutex<VecDeque<LogLine>> {
    static LINES: OnceLock<Mutex<VecDeque<LogLine>>> = OnceLock::new();
    LINES.get_or_init(|| Mutex::new(VecDeque::with_capacity(CAPACITY)))
}

/// The last `limit` lines, oldest first.
pub fn recent(limit: usize) -> Vec<LogLine> {
    let lines = buffer().lock().unwrap_or_else(|p| p.into_inner());
    lines.iter().skip(lines.len().saturating_sub(limit)).cloned().collect()
}

/// A tracing layer that keeps INFO and above.
pub struct Recent;

impl<S: Subscriber> tracing_subscriber::Layer<S> for Recent {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() > Level::INFO {
            return;
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        let line = LogLine {
            at: Utc::now(),
            level: meta.level().to_string(),
            target: meta.target().to_string(),
            message: text.0,
        };
        let mut lines = buffer().lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() == CAPACITY {
            lines.pop_front();
        }
        lines.push_back(line);
    }
}

struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let sep = if self.0.is_empty() { "" } else { " " };
        if field.name() == "message" {
            let _ = write!(self.0, "{sep}{value:?}");
        } else {
            let _ = write!(self.0, "{sep}{}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        let sep = if self.0.is_empty() { "" } else { " " };
        if field.name() == "message" {
            let _ = write!(self.0, "{sep}{value}");
        } else {
            let _ = write!(self.0, "{sep}{}={value}", field.name());
        }
    }
}
