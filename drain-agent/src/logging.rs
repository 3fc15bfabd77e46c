//! Log output: env_logger's human-readable lines, or one JSON object per line
//! (`--log-format json`) for log pipelines (Loki, Elasticsearch, CloudWatch) that would
//! otherwise have to parse free text.

use std::{
    io::Write as _,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

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

/// `--log-level`: the least severe records written. A level only: env_logger read any
/// other word (`warning`) as a module name to log, and the agent logged nothing, its fatal
/// start-up error included. `RUST_LOG` takes env_logger's whole syntax and overrides it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
    /// Nothing at all, not even a fatal error.
    Off,
}

impl LogLevel {
    /// The level as env_logger's filter spells it.
    const fn filter(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
            Self::Off => "off",
        }
    }
}

/// Sets up the global logger at `level` (RUST_LOG overrides it). A second call (tests) is
/// harmless.
pub fn init(level: LogLevel, format: LogFormat) {
    let env = env_logger::Env::default().default_filter_or(level.filter());
    let mut builder = env_logger::Builder::from_env(env);
    match format {
        LogFormat::Text => {
            builder.format(|buf, record| {
                writeln!(
                    buf,
                    "[{} {:<5} {}] {}",
                    rfc3339_millis(SystemTime::now()),
                    record.level(),
                    record.target(),
                    record.args()
                )
            });
        }
        LogFormat::Json => {
            builder.format(|buf, record| {
                let line = json_line(
                    &rfc3339_millis(SystemTime::now()),
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

/// `2026-01-01T00:00:00.000Z`: UTC, milliseconds. Written here rather than through
/// env_logger's `humantime` feature, which pulls in a whole date-time library (jiff) for this
/// one line; the date comes from Howard Hinnant's `civil_from_days` (proleptic Gregorian
/// calendar, exact for every day since 1970).
pub fn rfc3339_millis(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = secs / 86_400;
    let (hour, minute, second) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    // civil_from_days, for days >= 0: eras of 400 years (146,097 days) from 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{:03}Z",
        since.subsec_millis()
    )
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

/// What an answer says in place of a failure's detail ([`withheld`]).
pub const DETAIL_IN_LOG: &str = "the detail is in the agent's log";

/// How often the detail of a failure kept from an answer is WARNed (DEBUG between).
pub const WITHHELD_LOGGED_EVERY: Duration = Duration::from_secs(60);

/// A failure's detail kept from an answer (an HTTP body, a `/drained` answer's `unknown`, a
/// drain's record): its error chain may name host paths and processes (`/proc/<PID>/ns/net`,
/// `/run/netns/…`: SECURITY.md), which no caller is told. `what` (what failed, in general
/// terms) and `detail` (`{:#}`: an `anyhow` chain whole) go to the log, as a WARN at most
/// once per [`WITHHELD_LOGGED_EVERY`] (a failure every request meets must not flood it),
/// DEBUG between. Returns [`DETAIL_IN_LOG`], for the answer to say after `what`.
pub fn withheld(what: &str, detail: impl std::fmt::Display) -> &'static str {
    static LOGGED: Mutex<Option<Instant>> = Mutex::new(None);
    let mut logged = LOGGED.lock().unwrap_or_else(PoisonError::into_inner);
    if logged.is_none_or(|at| at.elapsed() >= WITHHELD_LOGGED_EVERY) {
        *logged = Some(Instant::now());
        drop(logged);
        log::warn!(
            "{what}: {detail:#} (not told to the caller; said at most once per {WITHHELD_LOGGED_EVERY:?})"
        );
    } else {
        drop(logged);
        log::debug!("{what}: {detail:#}");
    }
    DETAIL_IN_LOG
}

/// A failure whose text names nothing of the host: answers may say it whole ([`told`]).
#[derive(Debug)]
pub struct Told(pub String);

impl std::fmt::Display for Told {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Told {}

/// What an answer may say of `problem`: the text of a [`Told`] in its chain, or
/// [`DETAIL_IN_LOG`], the chain logged ([`withheld`], `what` naming what failed).
pub fn told(what: &str, problem: &anyhow::Error) -> String {
    match problem.downcast_ref::<Told>() {
        Some(told) => told.0.clone(),
        None => withheld(what, problem).to_owned(),
    }
}

/// `what: ` and what an answer may say of `problem` ([`told`]).
pub fn in_general(what: &str, problem: &anyhow::Error) -> String {
    format!("{what}: {}", told(what, problem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_millis() {
        let at = |secs: u64, millis: u64| {
            UNIX_EPOCH + std::time::Duration::from_millis(secs * 1000 + millis)
        };
        // The epoch; leap days of 2000 (divisible by 400) and 2024; 2100 is no leap year.
        for (secs, millis, want) in [
            (0, 0, "1970-01-01T00:00:00.000Z"),
            (951_782_400, 7, "2000-02-29T00:00:00.007Z"),
            (951_868_799, 999, "2000-02-29T23:59:59.999Z"),
            (1_709_164_800, 0, "2024-02-29T00:00:00.000Z"),
            (4_107_542_400, 0, "2100-03-01T00:00:00.000Z"),
            (1_798_761_599, 120, "2026-12-31T23:59:59.120Z"),
        ] {
            assert_eq!(rfc3339_millis(at(secs, millis)), want);
        }
        // Every day of 1970..2100 against a plain day-by-day count.
        let mut days = 0u64;
        for year in 1970..2100u64 {
            let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
            for (month, length) in [
                31,
                if leap { 29 } else { 28 },
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ]
            .into_iter()
            .enumerate()
            {
                for day in 1..=length {
                    let want = format!("{year:04}-{:02}-{day:02}T12:00:00.000Z", month + 1);
                    assert_eq!(rfc3339_millis(at(days * 86_400 + 43_200, 0)), want);
                    days += 1;
                }
            }
        }
    }

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
