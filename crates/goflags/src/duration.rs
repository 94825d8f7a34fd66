//! Durations spelled as Go's `time.ParseDuration` spells them (`90s`,
//! `1m30s`, `1.5h`, `500ms`, `250us`), one parser for every farmer program:
//! the coordinator's config, the buildlet's `timeout` parameter and
//! stage0's flags once disagreed (stage0 refused `1m30s`).
//!
//! [`parse`] wants a unit on every number (a config value of `30` could mean
//! seconds or minutes); [`parse_lenient`] also takes a bare number of
//! seconds, as command lines and the wire protocol always have.

use std::time::Duration;

/// Why a duration did not parse. The message is the tail of a sentence
/// ("… is not a valid duration: …"), so callers can quote the value first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DurationError {
    Empty,
    /// A number with nothing after it (only [`parse`] refuses this).
    NoUnit,
    UnknownUnit(String),
    Malformed,
    TooLong,
}

impl std::fmt::Display for DurationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const HINT: &str =
            "write a number with a unit (ms, s, m or h), e.g. \"90s\", \"10m\" or \"1h30m\"";
        match self {
            DurationError::Empty => write!(f, "is empty; {HINT}"),
            DurationError::NoUnit => write!(f, "has a number without a unit: {HINT}"),
            DurationError::UnknownUnit(u) => write!(f, "has an unknown unit {u:?}: {HINT}"),
            DurationError::Malformed => write!(f, "is not a valid duration: {HINT}"),
            DurationError::TooLong => write!(f, "is too long to be a duration: {HINT}"),
        }
    }
}

impl std::error::Error for DurationError {}

/// Units in nanoseconds.
const UNITS: [(&str, u128); 7] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// A sequence of `<number><unit>` terms: "1h30m", "500ms", ".5s". Every
/// number needs a unit.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let mut rest = text;
    if rest.is_empty() {
        return Err(DurationError::Empty);
    }
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
            return Err(DurationError::Malformed);
        }
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let Some((_, unit_nanos)) = UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(if unit.is_empty() {
                DurationError::NoUnit
            } else {
                DurationError::UnknownUnit(unit.to_string())
            });
        };
        let whole: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| DurationError::TooLong)?
        };
        let mut term = whole
            .checked_mul(*unit_nanos)
            .ok_or(DurationError::TooLong)?;
        // Digits past nanosecond precision cannot change the result.
        let frac_digits = &frac_part[..frac_part.len().min(18)];
        if !frac_digits.is_empty() {
            let frac: u128 = frac_digits.parse().map_err(|_| DurationError::TooLong)?;
            term = term
                .checked_add(frac * unit_nanos / 10u128.pow(frac_digits.len() as u32))
                .ok_or(DurationError::TooLong)?;
        }
        nanos = nanos.checked_add(term).ok_or(DurationError::TooLong)?;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| DurationError::TooLong)?;
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

/// Like [`parse`], and a bare number (`"2"`, `"1.5"`) is seconds.
pub fn parse_lenient(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return parse(&format!("{text}s"));
    }
    parse(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_forms() {
        for (text, want) in [
            ("30s", Duration::from_secs(30)),
            ("1m30s", Duration::from_secs(90)),
            ("1h30m", Duration::from_secs(5400)),
            ("1.5h", Duration::from_secs(5400)),
            (".5s", Duration::from_millis(500)),
            ("500ms", Duration::from_millis(500)),
            ("250us", Duration::from_micros(250)),
            ("250µs", Duration::from_micros(250)),
            ("7ns", Duration::from_nanos(7)),
            ("1m500ms", Duration::from_millis(60_500)),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(parse(text), Ok(want), "{text}");
            assert_eq!(parse_lenient(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bare_numbers_only_when_lenient() {
        assert_eq!(parse("10"), Err(DurationError::NoUnit));
        assert_eq!(parse("1h30"), Err(DurationError::NoUnit));
        assert_eq!(parse_lenient("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_lenient(" 1.5 "), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn refuses_malformed() {
        for bad in ["", "s", "10 m", "10min", "-5s", "ten", "1..5s", "+f", "5x"] {
            assert!(parse(bad).is_err(), "{bad:?}");
            assert!(parse_lenient(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse("99999999999999999999999h"),
            Err(DurationError::TooLong)
        );
        // A whole part just below the limit plus a fraction: refused, no
        // overflow (a buildlet parses `timeout` from the network).
        assert_eq!(
            parse_lenient("340282366920938463463374607431.999999999s"),
            Err(DurationError::TooLong)
        );
        assert_eq!(
            parse("10min"),
            Err(DurationError::UnknownUnit("min".into()))
        );
    }
}
