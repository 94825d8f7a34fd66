//! Durations written the way people say them ("30s", "1h30m"), so that a farm
//! config reads without unit comments.

use std::time::Duration;

/// Units accepted after a number, longest first so that "ms" is not read as "m".
const UNITS: [(&str, u128); 4] = [
    ("ms", 1_000_000),
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
];

/// The longest duration a config may hold: a year is beyond every sane
/// timeout, and the bound keeps `Instant + duration` from overflowing.
const MAX_HOURS: u128 = 24 * 366;
const MAX_NANOS: u128 = MAX_HOURS * 3_600_000_000_000;

/// Parses a sequence of `<number><unit>` terms such as "1h30m", "500ms" or "1.5h".
///
/// The error is the tail of a sentence ("is not a valid duration: ...") so
/// that callers can prefix it with the offending value.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    const HINT: &str =
        "write a number with a unit (ms, s, m or h), e.g. \"90s\", \"10m\" or \"1h30m\"";
    if text.is_empty() {
        return Err(format!("is empty; {HINT}"));
    }
    let mut rest = text;
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let int_part = &rest[..int_len];
        rest = &rest[int_len..];
        let mut frac_part = "";
        if let Some(after_dot) = rest.strip_prefix('.') {
            let frac_len = after_dot
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(after_dot.len());
            frac_part = &after_dot[..frac_len];
            rest = &after_dot[frac_len..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(format!("is not a valid duration: {HINT}"));
        }
        let Some((unit, unit_nanos)) = UNITS.iter().find(|(u, _)| rest.starts_with(u)) else {
            return Err(if rest.is_empty() {
                format!("has a number without a unit: {HINT}")
            } else {
                format!("has an unknown unit: {HINT}")
            });
        };
        rest = &rest[unit.len()..];
        let too_long = || format!("is too long to be a duration: {HINT}");
        let whole: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| too_long())?
        };
        let mut term = whole.checked_mul(*unit_nanos).ok_or_else(too_long)?;
        // Digits past nanosecond precision cannot change the result.
        let frac_digits = &frac_part[..frac_part.len().min(18)];
        if !frac_digits.is_empty() {
            let frac: u128 = frac_digits.parse().map_err(|_| too_long())?;
            term += frac * unit_nanos / 10u128.pow(frac_digits.len() as u32);
        }
        nanos = nanos.checked_add(term).ok_or_else(too_long)?;
    }
    if nanos > MAX_NANOS {
        return Err(format!(
            "is longer than {MAX_HOURS}h (a year), more than any timeout or interval of a farm needs"
        ));
    }
    Ok(Duration::new(
        (nanos / 1_000_000_000) as u64,
        (nanos % 1_000_000_000) as u32,
    ))
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
