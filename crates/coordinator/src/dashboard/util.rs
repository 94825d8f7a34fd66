//! Small helpers shared by the pages: durations, dates, query strings, and
//! the one-line view of a build used in every list.

use serde::Serialize;

use crate::store::{BuildRow, BuildStatus};

/// A duration for people: `850ms`, `4.2s`, `3m 05s`, `2h 10m`, `3d 4h`.
pub fn duration_ms(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if ms < 60_000 {
        return format!("{:.1}s", ms as f64 / 1000.0);
    }
    let s = ms / 1000;
    match s {
        s if s < 3600 && s % 60 == 0 => format!("{}m", s / 60),
        s if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        s if s < 86_400 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s < 86_400 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Whole-second duration between two instants in ms since the epoch.
pub fn since(then_ms: i64, now_ms: i64) -> String {
    let s = (now_ms - then_ms).max(0) / 1000;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// `2026-01-01 10:00` (UTC) from seconds since the epoch.
pub fn date_secs(secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}",
            t.year(),
            t.month() as u8,
            t.day(),
            t.hour(),
            t.minute()
        ),
        Err(_) => String::new(),
    }
}

/// `2026-01-01 10:00:05 UTC` from milliseconds since the epoch.
pub fn date_ms(ms: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            t.month() as u8,
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => String::new(),
    }
}

/// The first 10 characters of a commit hash.
pub fn short(hash: &str) -> &str {
    hash.get(..10).unwrap_or(hash)
}

/// `path?k=v&...`, percent-encoded, skipping empty values.
pub fn href(path: &str, params: &[(&str, &str)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (k, v) in params {
        if !v.is_empty() {
            q.append_pair(k, v);
            any = true;
        }
    }
    if any {
        format!("{path}?{}", q.finish())
    } else {
        path.to_string()
    }
}

/// A build as one line of a list (status page, machine and host pages).
#[derive(Debug, Clone, Serialize)]
pub struct BuildLine {
    pub id: i64,
    pub builder: String,
    pub repo: String,
    pub branch: String,
    pub commit: String,
    pub short: String,
    pub kind: &'static str,
    pub status: &'static str,
    /// The machine of the current (or last) attempt, when known.
    pub machine: String,
    /// When it was queued, started or finished, as an age.
    pub when: String,
    /// How long it ran or has been waiting.
    pub took: String,
    /// The error, the current step, or why it waits.
    pub detail: String,
}

impl BuildLine {
    pub fn new(b: &BuildRow, now: i64) -> BuildLine {
        let (when, took) = match b.status {
            BuildStatus::Queued => (
                format!("queued {} ago", since(b.created_at, now)),
                format!("waiting {}", since(b.created_at, now)),
            ),
            BuildStatus::Running => (
                format!(
                    "started {} ago",
                    since(b.started_at.unwrap_or(b.created_at), now)
                ),
                duration_ms(now - b.started_at.unwrap_or(now)),
            ),
            _ => (
                match b.finished_at {
                    Some(f) => format!("{} ago", since(f, now)),
                    None => String::new(),
                },
                match (b.started_at, b.finished_at) {
                    (Some(s), Some(f)) => duration_ms(f - s),
                    _ => String::new(),
                },
            ),
        };
        BuildLine {
            id: b.id,
            builder: b.builder.clone(),
            repo: b.repo.clone(),
            branch: b.branch.clone(),
            commit: b.commit.clone(),
            short: short(&b.commit).to_string(),
            kind: b.kind.as_str(),
            status: b.status.as_str(),
            machine: String::new(),
            when,
            took,
            detail: b.error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_dates() {
        assert_eq!(duration_ms(850), "850ms");
        assert_eq!(duration_ms(4_250), "4.2s");
        assert_eq!(duration_ms(185_000), "3m 05s");
        assert_eq!(duration_ms(7_800_000), "2h 10m");
        assert_eq!(duration_ms(300_000), "5m");
        assert_eq!(duration_ms(7_200_000), "2h");
        assert_eq!(since(0, 5_000), "5s");
        assert_eq!(date_secs(1_767_225_600), "2026-01-01 00:00");
        assert_eq!(date_ms(1_767_225_601_000), "2026-01-01 00:00:01 UTC");
        assert_eq!(
            href("/", &[("repo", "a b&c"), ("branch", ""), ("page", "2")]),
            "/?repo=a+b%26c&page=2"
        );
        assert_eq!(href("/x", &[("a", "")]), "/x");
    }
}
