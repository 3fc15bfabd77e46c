//! Log output: env_logger's human-readable lines, or one JSON object per line
//! (`--log-format json`) for log pipelines (Loki, Elasticsearch, CloudWatch) that would
//! otherwise have to parse free text.

use std::io::Write as _;

use clap::ValueEnum;

/// How log records are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `[2026-01-01T00:00:00.000Z INFO  drain_agent::agent] message`
    #[default]
    Text,
    /// `{"ts":"2026-01-01T00:00:00.000Z","level":"INFO","target":"drain_agent::agent","message":"…"}`
    Json,
}

/// Sets up the global logger at `level` (RUST_LOG overrides it). A second call (tests) is
/// harmless.
pub fn init(level: &str, format: LogFormat) {
    let env = env_logger::Env::default().default_filter_or(level);
    let mut builder = env_logger::Builder::from_env(env);
    match format {
        LogFormat::Text => {
            builder.format_timestamp_millis();
        }
        LogFormat::Json => {
            builder.format(|buf, record| {
                let ts = buf.timestamp_millis().to_string();
                let line = json_line(
                    &ts,
                    record.level().as_str(),
                    record.target(),
                    &record.args().to_string(),
                );
                writeln!(buf, "{line}")
            });
        }
    }
    let _ = builder.try_init();
}

/// One log record as a single-line JSON object. serde_json escapes newlines and control
/// characters, so a multi-line message (an error chain) stays on one line.
pub fn json_line(ts: &str, level: &str, target: &str, message: &str) -> String {
    /// A struct, not `json!`: fields in this order (serde_json sorts a map's keys).
    #[derive(serde::Serialize)]
    struct Line<'a> {
        ts: &'a str,
        level: &'a str,
        target: &'a str,
        message: &'a str,
    }
    let line = Line {
        ts,
        level,
        target,
        message,
    };
    serde_json::to_string(&line).unwrap_or_else(|_| format!("{{\"message\":{message:?}}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_are_one_object_per_line() {
        let line = json_line(
            "2026-01-01T00:00:00.000Z",
            "WARN",
            "drain_agent::agent",
            "two\nlines with \"quotes\" and \u{7}",
        );
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with(r#"{"ts":"#), "{line}");
        let value: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(value["level"], "WARN");
        assert_eq!(value["target"], "drain_agent::agent");
        assert_eq!(value["message"], "two\nlines with \"quotes\" and \u{7}");
        assert_eq!(value["ts"], "2026-01-01T00:00:00.000Z");
    }
}
