//! How a farm machine trusts the coordinator's TLS certificate.
//!
//! A small farm runs its coordinator with a self-signed certificate; machines
//! pin its SHA-256 (printed by the coordinator at start) with `-tls-pin`. A
//! farm with its own CA hands out the CA file (`-ca-file`); a coordinator with
//! a public certificate needs neither. Every program that dials the
//! coordinator (buildlet, stage0, bootstrapswarm, machine-tokend, `farmer
//! request`) uses this one crate, so they all accept the same flags and say
//! the same thing when a certificate does not match.

use std::path::PathBuf;
use std::sync::Arc;

/// How the coordinator's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// No TLS. Only for loopback tests and demos; the coordinator must allow it too.
    Plaintext,
    /// Accept exactly the certificate with this SHA-256 (of its DER).
    Pinned([u8; 32]),
    /// Verify against the CA certificates in this PEM file.
    CaFile(PathBuf),
    /// Verify against the public web PKI roots.
    WebPki,
}

/// A TLS setting that cannot work; the message names the file or value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// Parses a hex SHA-256 pin (colons allowed, as `openssl x509 -fingerprint` prints).
pub fn parse_pin(s: &str) -> Option<[u8; 32]> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
    }
    Some(out)
}

/// The rustls client configuration for `tls` (`None` for plaintext), with
/// the ring provider.
pub fn client_config(tls: &Tls) -> Result<Option<Arc<rustls::ClientConfig>>, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError(e.to_string()))?;
    let config = match tls {
        Tls::Plaintext => return Ok(None),
        Tls::Pinned(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: *pin,
                provider,
            }))
            .with_no_client_auth(),
        Tls::CaFile(path) => {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            let err = |e: String| ConfigError(format!("CA file {}: {e}", path.display()));
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(path).map_err(|e| err(e.to_string()))? {
                roots
                    .add(c.map_err(|e| err(e.to_string()))?)
                    .map_err(|e| err(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(err("holds no certificate".into()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Tls::WebPki => {
            let roots =
                rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Some(Arc::new(config)))
}

/// The host part of `HOST:PORT` or `[V6]:PORT`, for SNI.
pub fn host_part(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// Accepts exactly one certificate, by the SHA-256 of its DER encoding.
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        let got: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if bool::from(subtle::ConstantTimeEq::ct_eq(&got[..], &self.pin[..])) {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the coordinator's certificate does not match the pinned SHA-256 (-tls-pin)".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_and_hosts() {
        assert_eq!(parse_pin(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(parse_pin(&vec!["AB"; 32].join(":")), Some([0xab; 32]));
        assert_eq!(parse_pin("abc"), None);
        assert_eq!(parse_pin(&"zz".repeat(32)), None);
        assert_eq!(host_part("farm.example:443"), "farm.example");
        assert_eq!(host_part("[::1]:8080"), "::1");
    }

    #[test]
    fn empty_ca_file_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("farmtls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("empty.pem");
        std::fs::write(&f, "").unwrap();
        let e = client_config(&Tls::CaFile(f.clone()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds no certificate") && e.contains("empty.pem"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(client_config(&Tls::Plaintext).unwrap().is_none());
    }
}
