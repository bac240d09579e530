//! Logs on stderr in the formats log shippers read, as the Prometheus
//! exporters write them (`--log.format`): logfmt (the default) or JSON, one
//! event per line, never with terminal escape codes. A control character in
//! a logged value (an executable's name is anyone's choice) is escaped too,
//! so a log line cannot move a terminal's cursor or forge a second line.

use std::fmt::{self, Write as _};

use tracing::{
    Event, Level, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    EnvFilter,
    fmt::{
        FmtContext, FormatEvent, FormatFields,
        format::Writer,
        time::{FormatTime, SystemTime},
    },
    registry::LookupSpan,
};

/// `--log.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `time=... level=info target=... msg="..." key=value`, one event a line.
    #[default]
    Logfmt,
    /// One JSON object a line: `timestamp`, `level`, `message`, `target` and
    /// the event's fields.
    Json,
}

/// Installs the global subscriber: `RUST_LOG` if set and valid, else `level`
/// (a filter such as `info` or `fleetsnitch=debug`), else `info`.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    match format {
        LogFormat::Logfmt => builder.event_format(Logfmt).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// The logfmt line of an event: `time`, `level`, `target`, `msg`, then its
/// fields in the order they were written.
#[derive(Debug, Default, Clone, Copy)]
pub struct Logfmt;

impl<S, N> FormatEvent<S, N> for Logfmt
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut line = String::with_capacity(128);
        line.push_str("time=");
        push_value(&mut line, &time);
        line.push_str(" level=");
        line.push_str(level_name(*metadata.level()));
        line.push_str(" target=");
        push_value(&mut line, metadata.target());
        line.push_str(" msg=");
        push_value(&mut line, fields.message.as_deref().unwrap_or(""));
        line.push_str(&fields.rest);
        line.push('\n');
        writer.write_str(&line)
    }
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warn",
        Level::ERROR => "error",
    }
}

/// The event's message apart, its other fields already as ` key=value`.
#[derive(Default)]
struct Fields {
    message: Option<String>,
    rest: String,
}

impl Fields {
    fn add(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = Some(value.to_owned());
        } else {
            self.rest.push(' ');
            push_key(&mut self.rest, field.name());
            self.rest.push('=');
            push_value(&mut self.rest, value);
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.add(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.add(field, &format!("{value:?}"));
    }
}

/// A key as logfmt allows it: no space, `=`, quote or control character.
fn push_key(out: &mut String, key: &str) {
    for c in key.chars() {
        out.push(
            if c.is_whitespace() || c.is_control() || c == '=' || c == '"' {
                '_'
            } else {
                c
            },
        );
    }
}

/// A value, quoted when it is empty or holds a space, `=`, a quote, a
/// backslash or a control character; inside quotes `"` and `\` are escaped,
/// and control characters written as `\n`, `\t`, `\r` or `\u{..}`.
fn push_value(out: &mut String, value: &str) {
    let needs_quotes = value.is_empty()
        || value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '=' | '"' | '\\'));
    if !needs_quotes {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[test]
    fn values_are_quoted_only_when_needed_and_never_carry_control_characters() {
        let mut out = String::new();
        for value in [
            "plain",
            "",
            "two words",
            "a=b",
            "say \"hi\"",
            "back\\slash",
            "line\nbreak",
            "\u{1b}[31mred",
        ] {
            out.push('|');
            push_value(&mut out, value);
        }
        assert_eq!(
            out,
            "|plain|\"\"|\"two words\"|\"a=b\"|\"say \\\"hi\\\"\"|\"back\\\\slash\"\
             |\"line\\nbreak\"|\"\\u{1b}[31mred\""
        );
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Self;

        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }

    #[test]
    fn an_event_is_one_logfmt_line() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .event_format(Logfmt)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let path = "/tmp/evil\n\u{1b}[2Jexe";
            tracing::warn!(path, count = 3, error = %"no such file", "could not \"hash\"");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        let line = text.trim_end();
        assert!(line.starts_with("time=20"), "{line}");
        assert!(
            line.contains(
                " level=warn target=fleetsnitch::support::logging::tests \
                 msg=\"could not \\\"hash\\\"\" path=\"/tmp/evil\\n\\u{1b}[2Jexe\" \
                 count=3 error=\"no such file\""
            ),
            "{line}"
        );
    }
}
