//! The farm's secrets: values the config names (`secret:NAME`) but never
//! holds, so the TOML can be shared, reviewed and shown on pages.
//!
//! A secret is read from a file under the data dir (`secrets/NAME`, mode
//! 0600, written by `farmer secret set`) or from one of the coordinator's
//! environment variables. Builders' environments reference them; the config
//! check refuses a reference from a builder on an untrusted host type, and
//! every value is masked in build logs ([`Mask`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The prefix of a config value that names a secret instead of holding it.
pub const PREFIX: &str = "secret:";

/// Secrets shorter than this are refused: masking them would hide ordinary
/// output (a secret "1234" would blank every 1234 in every log).
pub const MIN_LEN: usize = 8;

/// Most bytes of one secret value (a token or a key, not a file store).
pub const MAX_LEN: usize = 64 * 1024;

/// The name a config value references, if it is `secret:NAME`.
pub fn reference(value: &str) -> Option<&str> {
    value.strip_prefix(PREFIX)
}

/// Whether a secret name is one the data dir can hold as a file name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.')
}

/// Where a secret's value comes from (`[secrets]` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `NAME = {}`: the file `DATA_DIR/secrets/NAME`.
    DataDir,
    /// `NAME = { file = "/path" }`.
    File(PathBuf),
    /// `NAME = { env = "VAR" }`: the coordinator's environment variable.
    Env(String),
}

impl Source {
    /// Where the value is read from, in words (for `farmer secret list`
    /// and errors); never the value.
    pub fn describe(&self, name: &str, data_dir: &Path) -> String {
        match self {
            Source::DataDir => format!("file {}", file_path(data_dir, name).display()),
            Source::File(p) => format!("file {}", p.display()),
            Source::Env(v) => format!("environment variable {v}"),
        }
    }
}

/// The file a data-dir secret lives in.
pub fn file_path(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("secrets").join(name)
}

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret {name:?}: {detail}")]
    Unreadable { name: String, detail: String },
    #[error("secret {0:?} is not declared in [secrets]")]
    Undeclared(String),
}

/// The secrets' values, read at start and at each reload.
#[derive(Clone, Default)]
pub struct Secrets {
    values: BTreeMap<String, String>,
    mask: Mask,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: a Debug print must never carry a value into a log.
        f.debug_struct("Secrets")
            .field("names", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Secrets {
    /// Reads every declared secret; the first that cannot be read (missing,
    /// readable by others, too short) is the error.
    pub fn load(
        declared: &BTreeMap<String, Source>,
        data_dir: &Path,
    ) -> Result<Secrets, SecretError> {
        let mut values = BTreeMap::new();
        for (name, source) in declared {
            let value = read(name, source, data_dir)?;
            values.insert(name.clone(), value);
        }
        let mask = Mask::new(values.values().map(|v| v.as_bytes().to_vec()).collect());
        Ok(Secrets { values, mask })
    }

    /// A secret's value.
    pub fn get(&self, name: &str) -> Result<&str, SecretError> {
        self.values
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| SecretError::Undeclared(name.to_string()))
    }

    /// `value` itself, or the secret it references.
    pub fn resolve<'a>(&'a self, value: &'a str) -> Result<&'a str, SecretError> {
        match reference(value) {
            Some(name) => self.get(name),
            None => Ok(value),
        }
    }

    /// What hides every value in logs.
    pub fn mask(&self) -> Mask {
        self.mask.clone()
    }
}

fn read(name: &str, source: &Source, data_dir: &Path) -> Result<String, SecretError> {
    let bad = |detail: String| SecretError::Unreadable {
        name: name.to_string(),
        detail,
    };
    let value = match source {
        Source::Env(var) => std::env::var(var).map_err(|_| {
            bad(format!(
                "the environment variable {var} is not set (or not UTF-8) in the coordinator's environment"
            ))
        })?,
        Source::DataDir | Source::File(_) => {
            let path = match source {
                Source::File(p) => p.clone(),
                _ => file_path(data_dir, name),
            };
            read_file(&path).map_err(|e| {
                bad(match source {
                    Source::DataDir => format!("{e}; set it with `farmer secret set {name}`"),
                    _ => e,
                })
            })?
        }
    };
    // A trailing newline is how editors and `echo` end files, not part of a token.
    let value = value.trim_end_matches(['\n', '\r']).to_string();
    if value.len() < MIN_LEN {
        return Err(bad(format!(
            "the value is {} bytes; at least {MIN_LEN} are needed so that masking it in logs hides nothing else",
            value.len()
        )));
    }
    if value.contains('\0') {
        return Err(bad("the value contains a NUL byte".into()));
    }
    Ok(value)
}

/// A secret file: must not be readable by group or others (as ssh insists
/// for keys), and is bounded.
fn read_file(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let f =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let meta = f
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is readable by others (mode {mode:03o}); run chmod 600 on it",
            path.display()
        ));
    }
    read_bounded(f, path)
}

/// A credential file's text, at most [`MAX_LEN`] bytes (a token, not a
/// file store), without the trailing newline editors add.
pub fn read_credential(path: &Path) -> Result<String, String> {
    let f =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    read_bounded(f, path).map(|s| s.trim_end_matches(['\n', '\r']).to_string())
}

fn read_bounded(f: std::fs::File, path: &Path) -> Result<String, String> {
    use std::io::Read;
    let mut s = String::new();
    f.take(MAX_LEN as u64 + 1)
        .read_to_string(&mut s)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if s.len() > MAX_LEN {
        return Err(format!("{} is larger than {MAX_LEN} bytes", path.display()));
    }
    Ok(s)
}

/// Writes a data-dir secret (mode 0600, replaced atomically).
pub fn store(data_dir: &Path, name: &str, value: &str) -> Result<PathBuf, String> {
    if !valid_name(name) {
        return Err(format!(
            "secret name {name:?} is not valid: use letters, digits, '-', '_' and '.', at most 64"
        ));
    }
    let value = value.trim_end_matches(['\n', '\r']);
    if value.len() < MIN_LEN {
        return Err(format!(
            "the value is {} bytes; a secret needs at least {MIN_LEN}",
            value.len()
        ));
    }
    if value.len() > MAX_LEN {
        return Err(format!("the value is larger than {MAX_LEN} bytes"));
    }
    let dir = data_dir.join("secrets");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    }
    let path = file_path(data_dir, name);
    atomicfile::write_private(&path, value.as_bytes())
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

/// What a masked value is replaced with.
pub const MASKED: &[u8] = b"***";

/// Hides secret values in text bound for logs and pages. Cheap to clone.
#[derive(Clone, Default)]
pub struct Mask {
    secrets: Arc<Vec<Vec<u8>>>,
}

impl Mask {
    pub fn new(mut secrets: Vec<Vec<u8>>) -> Mask {
        secrets.retain(|s| !s.is_empty());
        // Longest first: a secret that contains another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Mask {
            secrets: Arc::new(secrets),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// `text` with every whole occurrence of a secret replaced by `***`.
    pub fn apply<'a>(&self, text: &'a [u8]) -> Cow<'a, [u8]> {
        if self.secrets.is_empty() {
            return Cow::Borrowed(text);
        }
        let mut out: Option<Vec<u8>> = None;
        let mut i = 0;
        let mut copied = 0;
        while i < text.len() {
            let hit = self
                .secrets
                .iter()
                .find(|s| text[i..].starts_with(s))
                .map(Vec::len);
            match hit {
                Some(n) => {
                    let o = out.get_or_insert_with(|| Vec::with_capacity(text.len()));
                    o.extend_from_slice(&text[copied..i]);
                    o.extend_from_slice(MASKED);
                    i += n;
                    copied = i;
                }
                None => i += 1,
            }
        }
        match out {
            Some(mut o) => {
                o.extend_from_slice(&text[copied..]);
                Cow::Owned(o)
            }
            None => Cow::Borrowed(text),
        }
    }

    /// How much of `text` can be masked and shown now: all of it before
    /// the earliest place where a secret may begin that the text has not
    /// finished, moved back over any whole secret that place would cut.
    /// Decided on the raw text, so a short secret inside a longer one that
    /// is still arriving cannot hide the longer one.
    fn ready(&self, text: &[u8]) -> usize {
        let longest = self.secrets.first().map_or(0, Vec::len);
        let mut p = text.len();
        for start in text.len().saturating_sub(longest.saturating_sub(1))..text.len() {
            let rest = &text[start..];
            if self
                .secrets
                .iter()
                .any(|s| s.len() > rest.len() && s.starts_with(rest))
            {
                p = start;
                break;
            }
        }
        // At most one move per byte of the longest secret.
        for _ in 0..=longest {
            let from = p.saturating_sub(longest);
            let straddling = (from..p).find(|&q| {
                self.secrets
                    .iter()
                    .any(|s| q + s.len() > p && text[q..].starts_with(s))
            });
            match straddling {
                Some(q) => p = q,
                None => break,
            }
        }
        p
    }
}

/// Masks a stream that arrives in chunks (a command's output): a secret
/// split across two chunks is still hidden, because the end of a chunk that
/// could begin one is held back until the next chunk or [`Masking::finish`].
#[derive(Default)]
pub struct Masking {
    mask: Mask,
    held: Vec<u8>,
}

impl Masking {
    pub fn new(mask: Mask) -> Masking {
        Masking {
            mask,
            held: Vec::new(),
        }
    }

    /// The masked bytes that can be shown now.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.mask.is_empty() {
            return chunk.to_vec();
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(chunk);
        let ready = self.mask.ready(&buf);
        self.held = buf.split_off(ready);
        self.mask.apply(&buf).into_owned()
    }

    /// What is still held back, masked (the stream ended).
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.held);
        self.mask.apply(&rest).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_hides_every_occurrence_and_prefers_the_longest() {
        let m = Mask::new(vec![b"hunter2hunter2".to_vec(), b"hunter2h".to_vec()]);
        assert_eq!(
            &*m.apply(b"a hunter2hunter2 b hunter2h c hunter2"),
            b"a *** b *** c hunter2"
        );
        assert!(matches!(m.apply(b"nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn a_secret_split_across_chunks_is_hidden() {
        let secret = b"s3cr3t-token-value";
        let m = Mask::new(vec![secret.to_vec()]);
        let text = b"before s3cr3t-token-value after s3cr3t-tok".to_vec();
        // Every split point, and one byte at a time.
        for cut in 0..=text.len() {
            let mut s = Masking::new(m.clone());
            let mut out = s.feed(&text[..cut]);
            out.extend(s.feed(&text[cut..]));
            out.extend(s.finish());
            assert_eq!(out, b"before *** after s3cr3t-tok", "cut at {cut}");
        }
        let mut s = Masking::new(m);
        let mut out = Vec::new();
        for b in &text {
            out.extend(s.feed(std::slice::from_ref(b)));
        }
        out.extend(s.finish());
        assert_eq!(out, b"before *** after s3cr3t-tok");
    }

    /// A short secret inside a longer one that is still arriving does not
    /// let the rest of the longer one out.
    #[test]
    fn a_secret_inside_another_split_across_chunks_is_hidden() {
        let m = Mask::new(vec![
            b"tok-abcdefgh".to_vec(),
            b"tok-abcdefgh-rest-xyz".to_vec(),
        ]);
        let text = b"a tok-abcdefgh-rest-xyz b tok-abcdefgh c".to_vec();
        for cut in 0..=text.len() {
            for cut2 in cut..=text.len() {
                let mut s = Masking::new(m.clone());
                let mut out = s.feed(&text[..cut]);
                out.extend(s.feed(&text[cut..cut2]));
                out.extend(s.feed(&text[cut2..]));
                out.extend(s.finish());
                assert_eq!(out, b"a *** b *** c", "cuts at {cut}, {cut2}");
            }
        }
    }

    #[test]
    fn files_readable_by_others_and_short_values_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = store(dir.path(), "tok", "a-long-enough-value\n").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut declared = BTreeMap::new();
        declared.insert("tok".to_string(), Source::DataDir);
        let s = Secrets::load(&declared, dir.path()).unwrap();
        assert_eq!(s.get("tok").unwrap(), "a-long-enough-value");
        assert_eq!(s.resolve("secret:tok").unwrap(), "a-long-enough-value");
        assert_eq!(s.resolve("plain").unwrap(), "plain");
        assert!(!format!("{s:?}").contains("a-long"));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Secrets::load(&declared, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("readable by others") && e.contains("chmod 600"),
            "{e}"
        );

        assert!(store(dir.path(), "short", "1234").is_err());
        assert!(store(dir.path(), "../escape", "long-enough-value").is_err());
        declared.insert("missing".to_string(), Source::DataDir);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Secrets::load(&declared, dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("farmer secret set missing"), "{e}");
    }
}
