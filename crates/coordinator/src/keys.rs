//! Builder keys: the quick way a machine proves which host type it is.
//!
//! A builder key is `hex(HMAC-SHA256(master, host_type))`. The master key is
//! 32 random bytes created in the data dir on first start, readable only by
//! its owner. Because each key is derived from the host type, the admin can
//! hand out a key per host type without storing any, and a leaked key only
//! lets someone pose as that one host type. Keys are compared in constant time.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// File name of the master key inside the data dir.
pub const MASTER_KEY_FILE: &str = "master.key";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("master key {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("master key {0} is malformed: expected 64 hex digits")]
    Malformed(PathBuf),
}

/// The farm's master key, from which every builder key is derived.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// Loads `data_dir/master.key`, creating it (mode 0600) if missing.
    pub fn load_or_create(data_dir: &Path) -> Result<MasterKey, KeyError> {
        let path = data_dir.join(MASTER_KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(s) => Self::parse(&s).ok_or(KeyError::Malformed(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
                write_private(&path, format!("{}\n", hex::encode(key)).as_bytes()).map_err(
                    |err| KeyError::Io {
                        path: path.clone(),
                        err,
                    },
                )?;
                tracing::info!(path = %path.display(), "created the farm master key");
                Ok(MasterKey(key))
            }
            Err(err) => Err(KeyError::Io { path, err }),
        }
    }

    /// Loads an existing master key (for `genbuilderkey`).
    pub fn load(data_dir: &Path) -> Result<MasterKey, KeyError> {
        let path = data_dir.join(MASTER_KEY_FILE);
        let s = std::fs::read_to_string(&path).map_err(|err| KeyError::Io {
            path: path.clone(),
            err,
        })?;
        Self::parse(&s).ok_or(KeyError::Malformed(path))
    }

    fn parse(s: &str) -> Option<MasterKey> {
        let s = s.trim();
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(MasterKey(out))
    }

    /// A key derived from the master key for one purpose (a host type's
    /// builder key, the machine-token MAC key, ...).
    pub fn derive(&self, label: &str) -> [u8; 32] {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC accepts any key length");
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The builder key for a host type.
    pub fn builder_key(&self, host_type: &str) -> String {
        hex::encode(self.derive(host_type))
    }

    /// Checks a presented key in constant time.
    pub fn verify(&self, host_type: &str, presented: &str) -> bool {
        let want = self.builder_key(host_type);
        bool::from(want.as_bytes().ct_eq(presented.trim().as_bytes()))
    }
}

/// Writes a file readable only by its owner, atomically.
pub use atomicfile::write_private;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_per_host_type_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let m = MasterKey::load_or_create(dir.path()).unwrap();
        let a = m.builder_key("host-a");
        assert_eq!(a.len(), 64);
        assert_ne!(a, m.builder_key("host-b"));
        let again = MasterKey::load_or_create(dir.path()).unwrap();
        assert_eq!(again.builder_key("host-a"), a);
        assert!(m.verify("host-a", &a));
        assert!(m.verify("host-a", &format!("{a}\n")));
        assert!(!m.verify("host-b", &a));
        assert!(!m.verify("host-a", &a[..63]));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(MASTER_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.path().join(MASTER_KEY_FILE), "junk").unwrap();
        assert!(matches!(
            MasterKey::load(dir.path()),
            Err(KeyError::Malformed(_))
        ));
    }
}
