//! Durations as users write them: `500ms`, `30s`, `2m`, `1h`, `1.5s`, or plain seconds (`30`).

use std::time::Duration;

/// Parses a duration; the error says what was wrong, for a 400 body or a CLI message.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration (use e.g. 500ms, 30s, 2m or plain seconds)".into());
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let seconds_per_unit = match unit {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use ms, s, m or h)"
            ));
        }
    };
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(format!(
            "{text:?} is not a duration (use e.g. 500ms, 30s, 2m)"
        ));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (use e.g. 500ms, 30s, 2m)"))?;
    let seconds = value * seconds_per_unit;
    // A year is far beyond any drain; it also keeps the float conversion exact enough.
    if !(0.0..=31_536_000.0).contains(&seconds) {
        return Err(format!("{text:?} is too long"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Shows a duration the way it can be parsed back (`1.5s`, `250ms`).
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_forms() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn refuses_everything_else_with_a_reason() {
        for bad in [
            "", "  ", "abc", "-1", "5x", "s", "1.", ".5", "1..2s", "10 s", "1e3",
        ] {
            let error = parse_duration(bad).expect_err(bad);
            assert!(!error.is_empty(), "{bad}");
        }
        assert!(parse_duration("5x").unwrap_err().contains("unknown unit"));
        assert!(
            parse_duration("99999999h")
                .unwrap_err()
                .contains("too long")
        );
    }

    #[test]
    fn formats_round_trip() {
        for text in ["30s", "250ms", "1500ms", "0s"] {
            let parsed = parse_duration(text).expect(text);
            assert_eq!(parse_duration(&format_duration(parsed)), Ok(parsed));
        }
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
    }
}
