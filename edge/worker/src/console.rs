//! The core logs with `tracing` (job queued, dispatched, finished; agent connected,
//! refused…). A Worker has no stdout, so this subscriber turns each event into one console
//! line, which `wrangler tail` and Miniflare show: `INFO job finished job_id=… state=…`.
//! The core opens no spans, so spans are accepted and ignored.

use std::fmt::{self, Write as _};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{span, Event, Level, Metadata, Subscriber};
use worker::{console_error, console_log, console_warn};

/// Debug events stay out: one line per decision is enough on a hosted console.
const MAX_LEVEL: Level = Level::INFO;

pub struct Console;

/// Installs [`Console`] as the global subscriber (once; later calls change nothing).
pub fn install() {
    let _ = tracing::subscriber::set_global_default(Console);
}

impl Subscriber for Console {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= MAX_LEVEL
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::from_level(MAX_LEVEL))
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let level = *event.metadata().level();
        let text = line(level, event);
        if level == Level::ERROR {
            console_error!("{text}");
        } else if level == Level::WARN {
            console_warn!("{text}");
        } else {
            console_log!("{text}");
        }
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

/// `LEVEL message key=value key=value`.
pub fn line(level: Level, event: &Event<'_>) -> String {
    let mut fields = Fields::default();
    event.record(&mut fields);
    format!("{level} {}{}", fields.message, fields.rest)
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.rest, " {}={}", field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={:?}", field.name(), value);
        }
    }
}
