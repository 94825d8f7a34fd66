//! A located TOML tree and typed readers over it.
//!
//! serde's derived structs stop at the first unknown key or wrong type, but an
//! admin fixing a broken farm config wants every problem in one pass. So the
//! file is deserialized (with serde, through `toml`) into a generic tree whose
//! keys and array elements carry their byte spans ([`toml::Spanned`]), and the
//! readers below check keys and types themselves, recording every error and
//! carrying on.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

use super::{ConfigError, duration};

/// A TOML value. Table values are not spanned because `toml` has no span for
/// implicit tables (`hosts` in `[hosts.x]`); their keys are, which is enough.
pub(crate) enum Raw {
    Str(String),
    Int(i64),
    Float,
    Bool(bool),
    Array(Vec<Spanned<Raw>>),
    Table(Vec<(Spanned<String>, Raw)>),
}

impl Raw {
    fn kind(&self) -> &'static str {
        match self {
            Raw::Str(_) => "a string",
            Raw::Int(_) => "an integer",
            Raw::Float => "a float",
            Raw::Bool(_) => "a boolean",
            Raw::Array(_) => "an array",
            Raw::Table(_) => "a table",
        }
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RawVisitor;
        impl<'de> Visitor<'de> for RawVisitor {
            type Value = Raw;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a TOML value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Raw, E> {
                Ok(Raw::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Raw, E> {
                Ok(Raw::Str(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Raw, E> {
                Ok(Raw::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Raw, E> {
                Ok(Raw::Int(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Raw, E> {
                Ok(Raw::Float)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Raw, E> {
                Ok(Raw::Bool(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Raw::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Raw::Table(entries))
            }
        }
        deserializer.deserialize_any(RawVisitor)
    }
}

/// Where an error points: a byte offset into the text, or nowhere (line 0).
pub(crate) type At = Option<usize>;

/// Collects errors with their positions while the tree is read.
pub(crate) struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    pub(crate) errors: Vec<ConfigError>,
    /// Every `secret:NAME` read, checked once all sections are known.
    pub(super) secret_uses: Vec<super::forge::SecretUse>,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(file: &'a Path, text: &'a str) -> Self {
        Ctx {
            file,
            text,
            errors: Vec::new(),
            secret_uses: Vec::new(),
        }
    }

    pub(crate) fn file(&self) -> &'a Path {
        self.file
    }

    pub(crate) fn error(&mut self, at: At, field: &str, message: impl Into<String>) {
        let (line, column) = at.map_or((0, 0), |offset| self.line_column(offset));
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub(crate) fn line_column(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    pub(crate) fn line(&self, at: At) -> usize {
        at.map_or(0, |offset| self.line_column(offset).0)
    }

    /// The position of the value written after a key (`key = value`), so
    /// errors about a value point at it; the key itself for table headers.
    fn value_at(&self, key: &Spanned<String>) -> usize {
        let span = key.span();
        let bytes = self.text.as_bytes();
        let skip_blanks = |mut i: usize| {
            while i < bytes.len() && (bytes[i] == b' ' || bytes[i] == b'\t') {
                i += 1;
            }
            i
        };
        let eq = skip_blanks(span.end);
        if bytes.get(eq) == Some(&b'=') {
            let value = skip_blanks(eq + 1);
            if value < bytes.len() && bytes[value] != b'\n' && bytes[value] != b'\r' {
                return value;
            }
        }
        span.start
    }
}

/// Appends a key to a dotted field path, quoting it as TOML would if it is
/// not a bare key, so the path stays unambiguous.
pub(crate) fn join(path: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let key = if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

/// A table being read, with what is needed to report errors about it.
pub(crate) struct Table<'t> {
    pub(crate) path: String,
    /// Where the table is named; errors about missing keys point here.
    pub(crate) at: At,
    entries: &'t [(Spanned<String>, Raw)],
}

/// One `key = value` of a table.
pub(crate) struct Entry<'t> {
    pub(crate) key: &'t str,
    pub(crate) key_at: usize,
    pub(crate) value: &'t Raw,
    pub(crate) path: String,
    /// Where the value is written.
    pub(crate) at: usize,
}

impl<'t> Table<'t> {
    pub(crate) fn root(raw: &'t Raw) -> Self {
        let entries = match raw {
            Raw::Table(entries) => entries.as_slice(),
            _ => &[],
        };
        Table {
            path: String::new(),
            at: None,
            entries,
        }
    }

    pub(crate) fn entries(&self, ctx: &Ctx<'_>) -> Vec<Entry<'t>> {
        self.entries
            .iter()
            .map(|(key, value)| self.entry(ctx, key, value))
            .collect()
    }

    fn entry(&self, ctx: &Ctx<'_>, key: &'t Spanned<String>, value: &'t Raw) -> Entry<'t> {
        Entry {
            key: key.get_ref(),
            key_at: key.span().start,
            value,
            path: join(&self.path, key.get_ref()),
            at: ctx.value_at(key),
        }
    }

    pub(crate) fn get(&self, ctx: &Ctx<'_>, key: &str) -> Option<Entry<'t>> {
        self.entries
            .iter()
            .find(|(k, _)| k.get_ref() == key)
            .map(|(k, v)| self.entry(ctx, k, v))
    }

    /// Reports every key not in `known`, suggesting the closest known one.
    pub(crate) fn check_keys(&self, ctx: &mut Ctx<'_>, known: &[&str], what: &str) {
        for (key, _) in self.entries {
            let key_str = key.get_ref().as_str();
            if known.contains(&key_str) {
                continue;
            }
            let suggestion = known
                .iter()
                .map(|k| (edit_distance(k, key_str), k))
                .filter(|(d, _)| *d <= 2)
                .min()
                .map(|(_, k)| format!("did you mean \"{k}\"? "))
                .unwrap_or_default();
            ctx.error(
                Some(key.span().start),
                &join(&self.path, key_str),
                format!(
                    "unknown key \"{key_str}\" in {what}; {suggestion}known keys: {}",
                    known.join(", ")
                ),
            );
        }
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A string with where it is written, for checks made after reading.
pub(crate) struct Located {
    pub(crate) value: String,
    pub(crate) at: usize,
    pub(crate) path: String,
}

/// Typed readers. Each reports a type error and returns `None`, so the caller
/// falls back to a default and keeps checking the rest of the file.
impl Ctx<'_> {
    fn wrong_type(&mut self, at: usize, path: &str, expected: &str, found: &Raw) {
        self.error(
            Some(at),
            path,
            format!("expected {expected}, found {}", found.kind()),
        );
    }

    pub(crate) fn string(&mut self, e: &Entry<'_>) -> Option<String> {
        match e.value {
            Raw::Str(s) => Some(s.clone()),
            other => {
                self.wrong_type(e.at, &e.path, "a string", other);
                None
            }
        }
    }

    pub(crate) fn boolean(&mut self, e: &Entry<'_>) -> Option<bool> {
        match e.value {
            Raw::Bool(b) => Some(*b),
            other => {
                self.wrong_type(e.at, &e.path, "true or false", other);
                None
            }
        }
    }

    pub(crate) fn uint(&mut self, e: &Entry<'_>) -> Option<u32> {
        match e.value {
            Raw::Int(i) => match u32::try_from(*i) {
                Ok(n) => Some(n),
                Err(_) => {
                    self.error(
                        Some(e.at),
                        &e.path,
                        format!(
                            "{i} is out of range; use a whole number from 0 to {}",
                            u32::MAX
                        ),
                    );
                    None
                }
            },
            other => {
                self.wrong_type(e.at, &e.path, "a whole number", other);
                None
            }
        }
    }

    /// A positive duration: a string like "10m" or an integer number of seconds.
    pub(crate) fn duration(&mut self, e: &Entry<'_>) -> Option<Duration> {
        let d = match e.value {
            Raw::Str(s) => match duration::parse(s) {
                Ok(d) => d,
                Err(why) => {
                    self.error(Some(e.at), &e.path, format!("duration \"{s}\" {why}"));
                    return None;
                }
            },
            Raw::Int(i) if *i >= 0 => Duration::from_secs(i.unsigned_abs()),
            Raw::Int(i) => {
                self.error(
                    Some(e.at),
                    &e.path,
                    format!("duration {i} is negative; it must be greater than zero"),
                );
                return None;
            }
            other => {
                self.wrong_type(
                    e.at,
                    &e.path,
                    "a duration like \"10m\" or a number of seconds",
                    other,
                );
                return None;
            }
        };
        if d.is_zero() {
            self.error(Some(e.at), &e.path, "duration must be greater than zero");
            return None;
        }
        Some(d)
    }

    /// An array of strings, each with its position.
    pub(crate) fn string_list(&mut self, e: &Entry<'_>) -> Option<Vec<Located>> {
        let Raw::Array(items) = e.value else {
            self.wrong_type(e.at, &e.path, "an array of strings", e.value);
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("{}[{i}]", e.path);
            match item.get_ref() {
                Raw::Str(s) => out.push(Located {
                    value: s.clone(),
                    at: item.span().start,
                    path,
                }),
                other => {
                    self.wrong_type(item.span().start, &path, "a string", other);
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// A table of string values (environment, dimensions), in file order.
    /// Integers are accepted and kept as written, since `GOMAXPROCS = 1` means
    /// the obvious thing.
    pub(crate) fn string_map(&mut self, e: &Entry<'_>) -> Option<Vec<(Located, String)>> {
        let table = self.table(e)?;
        let mut out = Vec::new();
        for entry in table.entries(self) {
            let value = match entry.value {
                Raw::Str(s) => s.clone(),
                Raw::Int(i) => i.to_string(),
                other => {
                    self.wrong_type(entry.at, &entry.path, "a string", other);
                    continue;
                }
            };
            let key = Located {
                value: entry.key.to_owned(),
                at: entry.key_at,
                path: entry.path,
            };
            out.push((key, value));
        }
        Some(out)
    }

    pub(crate) fn table<'t>(&mut self, e: &Entry<'t>) -> Option<Table<'t>> {
        match e.value {
            Raw::Table(entries) => Some(Table {
                path: e.path.clone(),
                at: Some(e.key_at),
                entries,
            }),
            other => {
                self.wrong_type(e.at, &e.path, "a table", other);
                None
            }
        }
    }

    /// An array of tables (`[[x]]` sections or an inline array of inline tables).
    pub(crate) fn tables<'t>(&mut self, e: &Entry<'t>) -> Option<Vec<Table<'t>>> {
        let Raw::Array(items) = e.value else {
            self.wrong_type(e.at, &e.path, "an array of tables", e.value);
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let path = format!("{}[{i}]", e.path);
            match item.get_ref() {
                Raw::Table(entries) => out.push(Table {
                    path,
                    at: Some(item.span().start),
                    entries,
                }),
                other => self.wrong_type(item.span().start, &path, "a table", other),
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_characters() {
        let ctx = Ctx::new(Path::new("f"), "ab\nçd\n");
        assert_eq!(ctx.line_column(0), (1, 1));
        assert_eq!(ctx.line_column(3), (2, 1));
        assert_eq!(ctx.line_column(5), (2, 2));
        assert_eq!(ctx.line_column(100), (3, 1));
    }

    #[test]
    fn join_quotes_non_bare_keys() {
        assert_eq!(join("", "builders"), "builders");
        assert_eq!(join("builders", "linux-amd64"), "builders.linux-amd64");
        assert_eq!(join("builders", "go1.22"), "builders.\"go1.22\"");
    }

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("timeout", "timeout"), 0);
        assert_eq!(edit_distance("timeout", "timout"), 1);
        assert_eq!(edit_distance("host", "hots"), 2);
    }
}
