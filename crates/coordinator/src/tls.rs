//! The coordinator's TLS identity.
//!
//! A farm without a certificate from a public CA still gets TLS: on first
//! start the coordinator creates a self-signed certificate in the data dir
//! (`tls/cert.pem`, `tls/key.pem`) and prints two pins for `-tls-pin`: the
//! SHA-256 of its public key (`spki-sha256:HEX`, recommended: it survives
//! re-issuing the certificate with the same key) and the SHA-256 of the
//! certificate (plain hex, what older machines were given). An admin with a
//! real certificate points `--tls-cert`/`--tls-key` at it instead.
//!
//! The server offers ALPN `h2` and `http/1.1`; `server.rs` serves whichever
//! was chosen.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::keys::write_private;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {msg}")]
    Bad { path: PathBuf, msg: String },
    #[error("generating a certificate: {0}")]
    Generate(String),
}

/// A loaded certificate and key, ready to serve.
pub struct Identity {
    pub config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the leaf certificate's DER: the plain-hex `-tls-pin`.
    pub fingerprint: String,
    /// SHA-256 of the leaf's public key: the `-tls-pin=spki-sha256:HEX` form.
    pub spki_pin: String,
    pub cert_path: PathBuf,
}

/// Loads `cert`/`key`, or creates a self-signed pair at those paths.
pub fn load_or_create(cert: &Path, key: &Path, names: &[String]) -> Result<Identity, TlsError> {
    if !cert.exists() {
        let mut params = rcgen::CertificateParams::new(names.to_vec())
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "farmer coordinator");
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2046, 1, 1);
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        let c = params
            .self_signed(&kp)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        write_private(key, kp.serialize_pem().as_bytes()).map_err(|err| TlsError::Io {
            path: key.into(),
            err,
        })?;
        std::fs::write(cert, c.pem()).map_err(|err| TlsError::Io {
            path: cert.into(),
            err,
        })?;
        tracing::info!(cert = %cert.display(), "created a self-signed TLS certificate");
    }
    load(cert, key)
}

pub fn load(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Bad {
            path: cert.into(),
            msg: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Bad {
            path: cert.into(),
            msg: e.to_string(),
        })?;
    let leaf = certs.first().ok_or_else(|| TlsError::Bad {
        path: cert.into(),
        msg: "no certificate in the file".into(),
    })?;
    let fingerprint = farmtls::Pin::Cert(farmtls::cert_sha256(leaf.as_ref())).to_string();
    let spki = farmtls::spki_sha256(leaf.as_ref()).ok_or_else(|| TlsError::Bad {
        path: cert.into(),
        msg: "the certificate does not parse as an X.509 v3 certificate".into(),
    })?;
    let spki_pin = farmtls::Pin::Spki(spki).to_string();
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Bad {
        path: key.into(),
        msg: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Generate(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| TlsError::Bad {
            path: key.into(),
            msg: e.to_string(),
        })?;
    // h2 first: clients that can (curl, browsers) get HTTP/2; those that
    // offer only http/1.1, or no ALPN (the buildlet's `/reverse` upgrade),
    // get HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Identity {
        config: Arc::new(config),
        fingerprint,
        spki_pin,
        cert_path: cert.into(),
    })
}
