//! How a farm machine trusts the coordinator's TLS certificate.
//!
//! A small farm runs its coordinator with a self-signed certificate; machines
//! pin it with `-tls-pin` (both pins are printed by the coordinator at start).
//! A farm with its own CA hands out the CA file (`-ca-file`); a coordinator
//! with a public certificate needs neither.
//!
//! A pin is one of two forms (see [`Pin`]):
//!
//! * `spki-sha256:HEX`: the SHA-256 of the certificate's public key (its DER
//!   SubjectPublicKeyInfo, as HPKP and curl's `--pinnedpubkey` hash it). It
//!   survives renewing the certificate with the same key, so a renewal does
//!   not strand every machine. This is what the coordinator recommends.
//! * plain `HEX` (colons allowed, as `openssl x509 -fingerprint -sha256`
//!   prints): the SHA-256 of the whole certificate, exactly as before.
//!
//! The prefix, rather than plain hex matching either hash, keeps a pin's
//! meaning visible in a config file and lets an error say which of the two
//! did not match. Every program that dials the
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
    /// Accept exactly the certificate or public key this pin names.
    Pinned(Pin),
    /// Verify against the CA certificates in this PEM file.
    CaFile(PathBuf),
    /// Verify against the public web PKI roots.
    WebPki,
}

/// A TLS setting that cannot work; the message names the file or value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// What a `-tls-pin` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// SHA-256 of the certificate's DER: any change to the certificate,
    /// renewal included, breaks it.
    Cert([u8; 32]),
    /// SHA-256 of the certificate's DER SubjectPublicKeyInfo: holds as long
    /// as the coordinator keeps its key.
    Spki([u8; 32]),
}

/// What a `-tls-pin` may be, for error messages of every tool.
pub const PIN_FORMS: &str = "spki-sha256:HEX (SHA-256 of the coordinator's public key) or HEX (SHA-256 of its certificate; 64 hex digits, colons allowed)";

/// The prefix of a public-key pin.
pub const SPKI_PREFIX: &str = "spki-sha256:";

impl Pin {
    /// The pin a certificate satisfies in the form of `self`, in the same
    /// form (for error messages); `None` if the certificate does not parse.
    fn of(&self, cert_der: &[u8]) -> Option<Pin> {
        Some(match self {
            Pin::Cert(_) => Pin::Cert(cert_sha256(cert_der)),
            Pin::Spki(_) => Pin::Spki(spki_sha256(cert_der)?),
        })
    }

    fn bytes(&self) -> &[u8; 32] {
        match self {
            Pin::Cert(b) | Pin::Spki(b) => b,
        }
    }
}

/// The flag value: `spki-sha256:HEX` or plain `HEX`, as [`parse_pin`] reads it.
impl std::fmt::Display for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Pin::Spki(_) = self {
            f.write_str(SPKI_PREFIX)?;
        }
        f.write_str(&hex::encode(self.bytes()))
    }
}

/// SHA-256 of a certificate's DER (the plain-hex pin).
pub fn cert_sha256(cert_der: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(cert_der).into()
}

/// SHA-256 of a certificate's DER SubjectPublicKeyInfo (the `spki-sha256:`
/// pin); the same value as `openssl x509 -pubkey -noout | openssl pkey
/// -pubin -outform der | openssl dgst -sha256`. `None` if the certificate
/// does not parse.
pub fn spki_sha256(cert_der: &[u8]) -> Option<[u8; 32]> {
    use sha2::Digest;
    let der = rustls::pki_types::CertificateDer::from(cert_der);
    let cert = webpki::EndEntityCert::try_from(&der).ok()?;
    Some(sha2::Sha256::digest(cert.subject_public_key_info().as_ref()).into())
}

/// Parses a `-tls-pin`: `spki-sha256:HEX` for the public key, or plain `HEX`
/// (colons allowed, as `openssl x509 -fingerprint` prints) for the
/// certificate. The prefix is case-insensitive.
pub fn parse_pin(s: &str) -> Option<Pin> {
    let s = s.trim();
    match s.get(..SPKI_PREFIX.len()) {
        Some(p) if p.eq_ignore_ascii_case(SPKI_PREFIX) => {
            parse_hex32(&s[SPKI_PREFIX.len()..]).map(Pin::Spki)
        }
        _ => parse_hex32(s).map(Pin::Cert),
    }
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(&hex, &mut out).ok()?;
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

/// Accepts exactly one certificate (by the SHA-256 of its DER) or one
/// public key (by the SHA-256 of its SPKI). Intermediates, names and dates
/// are ignored: the pin is the whole trust decision.
#[derive(Debug)]
struct PinVerifier {
    pin: Pin,
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
        let got = self.pin.of(end_entity.as_ref());
        if let Some(got) = got
            && bool::from(subtle::ConstantTimeEq::ct_eq(
                &got.bytes()[..],
                &self.pin.bytes()[..],
            ))
        {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        // Saying what the coordinator presented (public data) lets an admin
        // tell a renewal from a wrong address at a glance.
        let what = match self.pin {
            Pin::Cert(_) => "certificate does not match the pinned SHA-256",
            Pin::Spki(_) => "public key does not match the pinned SHA-256 (spki-sha256:)",
        };
        let presented = got.map_or("a certificate that does not parse".into(), |p| {
            p.to_string()
        });
        Err(rustls::Error::General(format!(
            "the coordinator's {what} (-tls-pin={}); it presented {presented}",
            self.pin
        )))
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
        assert_eq!(parse_pin(&"ab".repeat(32)), Some(Pin::Cert([0xab; 32])));
        assert_eq!(
            parse_pin(&vec!["AB"; 32].join(":")),
            Some(Pin::Cert([0xab; 32]))
        );
        assert_eq!(parse_pin("abc"), None);
        assert_eq!(parse_pin(&"zz".repeat(32)), None);
        let spki = format!("spki-sha256:{}", "cd".repeat(32));
        assert_eq!(parse_pin(&spki), Some(Pin::Spki([0xcd; 32])));
        assert_eq!(parse_pin(&spki.to_uppercase()), Some(Pin::Spki([0xcd; 32])));
        assert_eq!(parse_pin("spki-sha256:abc"), None);
        assert_eq!(parse_pin("sha1:abc"), None);
        assert_eq!(parse_pin("spki-sha256\u{e9}"), None);
        // Display gives back what parse_pin reads.
        for p in [Pin::Cert([1; 32]), Pin::Spki([2; 32])] {
            assert_eq!(parse_pin(&p.to_string()), Some(p));
        }
        assert_eq!(host_part("farm.example:443"), "farm.example");
        assert_eq!(host_part("[::1]:8080"), "::1");
    }

    #[test]
    fn spki_pins_survive_reissuing_with_the_same_key() {
        use rcgen::PublicKeyData;
        use rustls::client::danger::ServerCertVerifier;
        use sha2::Digest;
        let key = rcgen::KeyPair::generate().unwrap();
        let make = |cn: &str| {
            let mut p = rcgen::CertificateParams::new(vec!["farm.test".to_string()]).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            p.self_signed(&key).unwrap().der().clone()
        };
        let (old, new) = (make("one"), make("two"));
        let spki: [u8; 32] = sha2::Sha256::digest(key.subject_public_key_info()).into();
        assert_eq!(spki_sha256(&old), Some(spki));
        assert_eq!(spki_sha256(&new), Some(spki));
        assert_ne!(cert_sha256(&old), cert_sha256(&new));
        assert_eq!(spki_sha256(b"not a certificate"), None);

        let verify = |pin: Pin, cert: &rustls::pki_types::CertificateDer<'_>| {
            let v = PinVerifier {
                pin,
                provider: Arc::new(rustls::crypto::ring::default_provider()),
            };
            v.verify_server_cert(
                cert,
                &[],
                &rustls::pki_types::ServerName::try_from("farm.test").unwrap(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        assert!(verify(Pin::Spki(spki), &old).is_ok());
        assert!(verify(Pin::Spki(spki), &new).is_ok());
        assert!(verify(Pin::Cert(cert_sha256(&old)), &old).is_ok());
        let e = verify(Pin::Cert(cert_sha256(&old)), &new).unwrap_err();
        assert!(
            e.contains("certificate does not match the pinned SHA-256"),
            "{e}"
        );
        let e = verify(Pin::Spki([7; 32]), &new).unwrap_err();
        assert!(
            e.contains("public key does not match") && e.contains(&Pin::Spki(spki).to_string()),
            "{e}"
        );
        let junk = rustls::pki_types::CertificateDer::from(&b"junk"[..]);
        assert!(verify(Pin::Spki(spki), &junk).is_err());
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
