//! Machine tokens: the signed request that trades a certificate for a token,
//! and the token file a machine keeps.
//!
//! The request proves possession of the certificate's private key by signing
//! [`signed_message`]: a fixed label, a timestamp (checked within ±10 min by
//! the coordinator, so a captured request is useless later) and the SHA-256 of
//! the certificate.

use std::path::Path;

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// Path of the coordinator's token endpoint.
pub const TOKEN_PATH: &str = "/auth/machine-token";

/// Environment variable naming the token file, as LUCI's bots use.
pub const TOKEN_ENV: &str = "LUCI_MACHINE_TOKEN";

/// What a machine POSTs to [`TOKEN_PATH`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRequest {
    pub cert_pem: String,
    /// Unix seconds when the request was signed.
    pub timestamp: i64,
    /// Base64 of the signature over [`signed_message`].
    pub signature: String,
}

/// What the coordinator answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: String,
    pub hostname: String,
    /// Unix seconds.
    pub expiry: i64,
}

/// The bytes a token request signs.
pub fn signed_message(timestamp: i64, cert_der: &[u8]) -> Vec<u8> {
    let digest = sha2::Sha256::digest(cert_der);
    let hex = hex::encode(digest);
    format!("farmer-machine-token-v1\n{timestamp}\n{hex}\n").into_bytes()
}

/// Decodes the first certificate of a PEM text.
pub fn cert_der(cert_pem: &str) -> Result<Vec<u8>, String> {
    let body: String = cert_pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    if body.is_empty() {
        return Err("no PEM CERTIFICATE block".into());
    }
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|e| format!("certificate PEM is not valid base64: {e}"))
}

/// Signs a token request with the machine's private key (PKCS#8 PEM).
///
/// Both PKCS#8 v1 (what genbotcert and `openssl genpkey` write) and v2 (what
/// genbotcert wrote before, with the public key embedded) are read, so
/// machines onboarded earlier keep working.
pub fn sign_request(cert_pem: &str, key_pem: &str, timestamp: i64) -> Result<TokenRequest, String> {
    use rcgen::SigningKey;
    let der = cert_der(cert_pem)?;
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| format!("private key: {e}"))?;
    let sig = key
        .sign(&signed_message(timestamp, &der))
        .map_err(|e| format!("signing: {e}"))?;
    Ok(TokenRequest {
        cert_pem: cert_pem.to_string(),
        timestamp,
        signature: base64::engine::general_purpose::STANDARD.encode(sig),
    })
}

/// The token file `machine-tokend` writes and bots read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenFile {
    pub token: String,
    pub hostname: String,
    /// Unix seconds when the token expires.
    pub expiry: i64,
    /// Unix seconds of the last successful refresh.
    pub last_update: i64,
    /// Unix seconds after which the next run refreshes (half-life).
    pub next_update: i64,
    /// SHA-256 (hex) of the certificate the token was minted for; a new
    /// certificate forces a refresh.
    pub cert_sha256: String,
}

impl TokenFile {
    pub fn read(path: &Path) -> Result<TokenFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("token file {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("token file {}: {e}", path.display()))
    }

    /// Writes the file atomically (temp file + rename), mode 0644.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let data = serde_json::to_vec_pretty(self)?;
        atomicfile::write(path, &data, Some(0o644))
    }
}

/// The default token file path: `$LUCI_MACHINE_TOKEN`, else
/// `~/.farmer/machine-token.json`.
pub fn default_token_path() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os(TOKEN_ENV).filter(|p| !p.is_empty()) {
        return p.into();
    }
    let home = std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| ".".into());
    home.join(".farmer").join("machine-token.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_files_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token.json");
        let a = TokenFile {
            token: "a".repeat(1000),
            hostname: "h".into(),
            expiry: 10,
            last_update: 1,
            next_update: 5,
            cert_sha256: "00".into(),
        };
        a.write(&p).unwrap();
        assert_eq!(TokenFile::read(&p).unwrap(), a);
        let b = TokenFile {
            token: "b".into(),
            ..a.clone()
        };
        b.write(&p).unwrap();
        assert_eq!(TokenFile::read(&p).unwrap(), b);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["token.json"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o644
            );
        }
    }

    #[test]
    fn request_signatures_cover_timestamp_and_certificate() {
        let g = crate::csr::generate("host-a", "x.test", crate::csr::KeyType::P256).unwrap();
        // A throwaway self-signed certificate stands in for the farm's.
        let kp = rcgen::KeyPair::from_pem(&g.key_pem).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["host-a.x.test".to_string()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let r1 = sign_request(&cert.pem(), &g.key_pem, 100).unwrap();
        let r2 = sign_request(&cert.pem(), &g.key_pem, 101).unwrap();
        assert_ne!(r1.signature, r2.signature);
        assert_ne!(signed_message(100, b"a"), signed_message(100, b"b"));
        assert!(sign_request("not pem", &g.key_pem, 1).is_err());
    }

    #[test]
    fn keys_written_before_v1_still_sign() {
        // genbotcert used to write ring's PKCS#8 v2; machine-tokend must keep
        // reading those keys, and the v1 form of the same key signs the same
        // (Ed25519 signatures are deterministic).
        let v2 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let v1_der = crate::csr::ed25519_pkcs8_v1(v2.serialized_der()).unwrap();
        let v1 = rcgen::KeyPair::try_from(v1_der).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["host-a.x.test".to_string()])
            .unwrap()
            .self_signed(&v2)
            .unwrap();
        let a = sign_request(&cert.pem(), &v2.serialize_pem(), 100).unwrap();
        let b = sign_request(&cert.pem(), &v1.serialize_pem(), 100).unwrap();
        assert_eq!(a.signature, b.signature);
    }
}
