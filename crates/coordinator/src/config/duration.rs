//! Durations written the way people say them ("30s", "1h30m"), so that a farm
//! config reads without unit comments.

use std::time::Duration;

/// The longest duration a config may hold: a year is beyond every sane
/// timeout, and the bound keeps `Instant + duration` from overflowing.
const MAX_HOURS: u128 = 24 * 366;
const MAX_NANOS: u128 = MAX_HOURS * 3_600_000_000_000;

/// Parses a sequence of `<number><unit>` terms such as "1h30m", "500ms" or
/// "1.5h" (the parser every farmer program shares, which wants a unit on
/// every number in a config), at most a year.
///
/// The error is the tail of a sentence ("is not a valid duration: ...") so
/// that callers can prefix it with the offending value.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let d = goflags::duration::parse(text).map_err(|e| e.to_string())?;
    if d.as_nanos() > MAX_NANOS {
        return Err(format!(
            "is longer than {MAX_HOURS}h (a year), more than any timeout or interval of a farm needs"
        ));
    }
    Ok(d)
}

/// Formats a duration in the syntax [`parse`] accepts, so messages quote values
/// the admin can paste back into the file.
pub(crate) fn format(d: Duration) -> String {
    let total_ms = d.as_millis();
    if total_ms == 0 {
        return if d.is_zero() {
            "0s".into()
        } else {
            format!("{}ns", d.as_nanos())
        };
    }
    let (h, rem) = (total_ms / 3_600_000, total_ms % 3_600_000);
    let (m, rem) = (rem / 60_000, rem % 60_000);
    let (s, ms) = (rem / 1000, rem % 1000);
    let mut out = String::new();
    for (value, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
        if value != 0 {
            out.push_str(&format!("{value}{unit}"));
        }
    }
    out
}

/// A rough age or wait for people to read on pages and in notes ("90s",
/// "5m", "3h", "2d"), in whole units. Here rather than in the views (`view`) so
/// that state below the farm (release notes) can word durations the same way.
pub fn human_duration(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1m500ms"), Ok(Duration::from_millis(60_500)));
        assert_eq!(parse("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(parse("8784h"), Ok(Duration::from_secs(8784 * 3600)));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "10",
            "s",
            "10 m",
            "10min",
            "1h30",
            "-5s",
            "ten",
            "1..5s",
            "99999999999999999999999h",
            "9223372036854775807s",
            "8785h",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn formats_round_trip() {
        for text in ["1h30m", "500ms", "10m", "1h", "45s", "1m500ms"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
        assert_eq!(format(Duration::ZERO), "0s");
    }
}
