//! The signed release manifest: which buildlet binary is current for a
//! platform, and the farm release key's Ed25519 signature over it.
//!
//! The coordinator serves it at `/stage0/manifest?os=OS&arch=ARCH` as JSON.
//! The signature covers a canonical text rendering of every field
//! ([`Manifest::signed_message`]), not the JSON, so no JSON canonicalization
//! is needed and no field can be changed without breaking it: the platform
//! (a Linux binary cannot be replayed to a Mac), the version label, the
//! SHA-256 and size of the binary, the protocol version it speaks and when it
//! was published (stage0 refuses a manifest older than the one it installed,
//! so an old signed release cannot be replayed as a downgrade).

use std::io::Read;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::platform::Platform;

/// First line of the signed message; bump it if the message format changes.
const DOMAIN: &str = "farmer-buildlet-release/1";

/// One published buildlet binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub os: String,
    pub arch: String,
    /// The admin's version label (`--version`), e.g. `2026.03.1` or `0.1.0-3f2a9c1d0b7e`.
    pub version: String,
    /// Hex SHA-256 of the binary.
    pub sha256: String,
    /// Size of the binary in bytes.
    pub size: u64,
    /// The buildlet protocol version the binary speaks (what the coordinator's
    /// `min_buildlet_version` is compared with).
    pub protocol: u32,
    /// When it was published, milliseconds since the Unix epoch.
    pub published_at: i64,
    /// Hex Ed25519 signature of [`Manifest::signed_message`].
    #[serde(default)]
    pub signature: String,
    /// Hex public key that made the signature (informational: stage0 checks
    /// against the key it was installed with, never this one).
    #[serde(default)]
    pub key: String,
}

/// Why a manifest or a binary was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the manifest is for {got}, this machine is {want}")]
    WrongPlatform { want: String, got: String },
    #[error(
        "the manifest's signature does not verify against the release key {key}: refusing it (was the binary published with another farm's key, or changed after publishing?)"
    )]
    BadSignature { key: String },
    #[error("malformed manifest: {0}")]
    Malformed(String),
    #[error(
        "the binary's SHA-256 is {got} ({got_size} bytes) but the signed manifest says {want} ({want_size} bytes): refusing it"
    )]
    DigestMismatch {
        want: String,
        got: String,
        want_size: u64,
        got_size: u64,
    },
    #[error(
        "the offered release {offered} (published {offered_at}) is older than the installed {installed} (published {installed_at}): refusing a downgrade"
    )]
    Rollback {
        offered: String,
        offered_at: i64,
        installed: String,
        installed_at: i64,
    },
}

fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
}

/// Checks a version label: 1 to 64 of `A-Z a-z 0-9 . _ - +`.
pub fn check_version_label(s: &str) -> Result<(), String> {
    if valid_label(s) {
        Ok(())
    } else {
        Err(format!(
            "version {s:?} must be 1 to 64 letters, digits or . _ - + (like 2026.03.1)"
        ))
    }
}

impl Manifest {
    pub fn platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            arch: self.arch.clone(),
        }
    }

    /// The exact bytes the release key signs.
    pub fn signed_message(&self) -> Vec<u8> {
        format!(
            "{DOMAIN}\nos={}\narch={}\nversion={}\nsha256={}\nsize={}\nprotocol={}\npublished_at={}\n",
            self.os,
            self.arch,
            self.version,
            self.sha256,
            self.size,
            self.protocol,
            self.published_at
        )
        .into_bytes()
    }

    fn check_fields(&self) -> Result<(), VerifyError> {
        let bad = |m: String| Err(VerifyError::Malformed(m));
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if !name_ok(&self.os) || !name_ok(&self.arch) {
            return bad(format!("bad platform {:?}/{:?}", self.os, self.arch));
        }
        if !valid_label(&self.version) {
            return bad(format!("bad version label {:?}", self.version));
        }
        if self.sha256.len() != 64
            || !self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return bad(format!("bad sha256 {:?}", self.sha256));
        }
        Ok(())
    }

    /// Fills `signature` and `key`.
    pub fn sign(&mut self, key: &SigningKey) {
        let sig = key.sign(&self.signed_message());
        self.signature = hex::encode(sig.to_bytes());
        self.key = hex::encode(key.verifying_key().as_bytes());
    }

    /// Checks the fields, the platform and the signature.
    pub fn verify(&self, key: &ReleaseKey, platform: &Platform) -> Result<(), VerifyError> {
        self.check_fields()?;
        if self.os != platform.os || self.arch != platform.arch {
            return Err(VerifyError::WrongPlatform {
                want: platform.to_string(),
                got: format!("{}/{}", self.os, self.arch),
            });
        }
        let bad = || VerifyError::BadSignature {
            key: key.to_string(),
        };
        let sig: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        key.0
            .verify(&self.signed_message(), &Signature::from_bytes(&sig))
            .map_err(|_| bad())
    }

    /// Checks that a file is the binary this manifest describes.
    pub fn check_file(&self, path: &Path) -> Result<(), FileCheckError> {
        let (got, got_size) = sha256_file(path).map_err(FileCheckError::Io)?;
        self.check_digest(&got, got_size)
            .map_err(FileCheckError::Verify)
    }

    /// Compares a computed digest and size with the manifest's.
    pub fn check_digest(&self, sha256: &str, size: u64) -> Result<(), VerifyError> {
        if sha256 == self.sha256 && size == self.size {
            Ok(())
        } else {
            Err(VerifyError::DigestMismatch {
                want: self.sha256.clone(),
                got: sha256.to_string(),
                want_size: self.size,
                got_size: size,
            })
        }
    }
}

/// [`Manifest::check_file`] failed to read the file, or the file is not the one.
#[derive(Debug, thiserror::Error)]
pub enum FileCheckError {
    #[error("{0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Verify(VerifyError),
}

/// The farm's release public key, which stage0 is installed with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ReleaseKey(pub VerifyingKey);

impl ReleaseKey {
    /// Parses 64 hex digits (as printed by `farmer buildlet publish` and
    /// served at `/stage0/release-key`), ignoring surrounding whitespace and
    /// an optional `ed25519:` prefix.
    pub fn parse(s: &str) -> Result<ReleaseKey, String> {
        let t = s.trim();
        let t = t.strip_prefix("ed25519:").unwrap_or(t);
        let bytes: [u8; 32] = hex::decode(t)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                format!("release key {t:?} is not an Ed25519 public key in hex (64 hex digits)")
            })?;
        VerifyingKey::from_bytes(&bytes)
            .map(ReleaseKey)
            .map_err(|e| format!("release key {t:?}: {e}"))
    }

    pub fn from_signing(k: &SigningKey) -> ReleaseKey {
        ReleaseKey(k.verifying_key())
    }
}

impl std::fmt::Display for ReleaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0.as_bytes()))
    }
}

impl std::fmt::Debug for ReleaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReleaseKey({self})")
    }
}

/// Hex SHA-256 and size of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            break;
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn manifest() -> Manifest {
        Manifest {
            os: "linux".into(),
            arch: "x86_64".into(),
            version: "1.2.3".into(),
            sha256: "ab".repeat(32),
            size: 42,
            protocol: 1,
            published_at: 1_700_000_000_000,
            signature: String::new(),
            key: String::new(),
        }
    }

    #[test]
    fn sign_and_verify() {
        let k = key(7);
        let rk = ReleaseKey::from_signing(&k);
        let here = Platform::parse("linux", "amd64").unwrap();
        let mut m = manifest();
        m.sign(&k);
        assert_eq!(m.verify(&rk, &here), Ok(()));
        assert_eq!(ReleaseKey::parse(&rk.to_string()).unwrap(), rk);
        assert_eq!(ReleaseKey::parse(&format!(" ed25519:{rk}\n")).unwrap(), rk);

        // Every signed field is covered.
        for change in [
            |m: &mut Manifest| m.version = "1.2.4".into(),
            |m: &mut Manifest| m.sha256 = "cd".repeat(32),
            |m: &mut Manifest| m.size = 43,
            |m: &mut Manifest| m.protocol = 2,
            |m: &mut Manifest| m.published_at += 1,
        ] {
            let mut t = m.clone();
            change(&mut t);
            assert!(
                matches!(t.verify(&rk, &here), Err(VerifyError::BadSignature { .. })),
                "{t:?}"
            );
        }
        // Another farm's key.
        let other = ReleaseKey::from_signing(&key(8));
        assert!(matches!(
            m.verify(&other, &here),
            Err(VerifyError::BadSignature { .. })
        ));
        // Another platform, even when correctly signed.
        let mac = Platform::parse("darwin", "arm64").unwrap();
        assert!(matches!(
            m.verify(&rk, &mac),
            Err(VerifyError::WrongPlatform { .. })
        ));
        // Garbage signature.
        let mut t = m.clone();
        t.signature = "zz".into();
        assert!(matches!(
            t.verify(&rk, &here),
            Err(VerifyError::BadSignature { .. })
        ));
        // Newline injection in the label cannot forge another field.
        let mut t = m.clone();
        t.version = "1\nsize=1".into();
        assert!(matches!(
            t.verify(&rk, &here),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[test]
    fn file_digest() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("b");
        std::fs::write(&f, b"hello").unwrap();
        let (d, n) = sha256_file(&f).unwrap();
        assert_eq!(
            d,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let mut m = manifest();
        m.sha256 = d;
        m.size = n;
        assert!(m.check_file(&f).is_ok());
        std::fs::write(&f, b"hellO").unwrap();
        assert!(matches!(
            m.check_file(&f),
            Err(FileCheckError::Verify(VerifyError::DigestMismatch { .. }))
        ));
    }

    #[test]
    fn keys_parse() {
        assert!(ReleaseKey::parse("abc").is_err());
        assert!(ReleaseKey::parse(&"zz".repeat(32)).is_err());
        assert_eq!(hex::decode("0aFF").ok(), Some(vec![10, 255]));
        assert_eq!(hex::encode([10, 255]), "0aff");
        // The hand-written decoder this replaced read "+f" as a byte.
        assert!(hex::decode("+f").is_err());
    }
}
