//! The farm's certificate authority for machine certificates.
//!
//! Created on first use in the data dir (`ca/ca.pem`, `ca/ca.key` mode 0600).
//! It signs a bot's CSR only when the CSR's subject CN and its single DNS SAN
//! are exactly the name the builder request was made for, and it verifies
//! that a presented certificate was issued by it.
//!
//! Certificates are made to pass `openssl verify -x509_strict`: the CA
//! carries a Subject Key Identifier and every issued certificate an
//! Authority Key Identifier naming it, so tools that build chains by key id
//! (OpenSSL, Go, browsers' strict modes) find the issuer. Each farm's CA has
//! its own subject, so two farms' CAs (or a farm's old and new CA) are never
//! confused by name in a trust store or a log.

use std::path::Path;

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, DnValue, Issuer, KeyPair, SanType,
};
use x509_parser::prelude::*;

use crate::keys::write_private;

pub struct Ca {
    cert_pem: String,
    cert_der: Vec<u8>,
    key: KeyPair,
    /// The CA's notBefore (Unix seconds); no issued certificate starts earlier.
    not_before: i64,
}

/// Facts about a certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub serial: String,
    pub not_after: i64,
}

impl Ca {
    pub fn load_or_create(data_dir: &Path) -> Result<Ca, String> {
        let dir = data_dir.join("ca");
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if !cert_path.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let key =
                KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
            let mut params = CertificateParams::default();
            let id: [u8; 8] = rand::random();
            params.distinguished_name.push(
                DnType::CommonName,
                format!("farmer machine CA {}", hex::encode(id)),
            );
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            // Valid from its creation (a fixed past date would claim it
            // signed things before it existed), for 20 years.
            let now = time_now()
                .replace_nanosecond(0)
                .map_err(|e| e.to_string())?;
            params.not_before = now;
            params.not_after = now + ::time::Duration::days(20 * 365);
            let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
            write_private(&key_path, key.serialize_pem().as_bytes())
                .map_err(|e| format!("{}: {e}", key_path.display()))?;
            std::fs::write(&cert_path, cert.pem())
                .map_err(|e| format!("{}: {e}", cert_path.display()))?;
            tracing::info!(path = %cert_path.display(), "created the machine certificate authority");
        }
        let cert_pem = std::fs::read_to_string(&cert_path)
            .map_err(|e| format!("{}: {e}", cert_path.display()))?;
        let key_pem = std::fs::read_to_string(&key_path)
            .map_err(|e| format!("{}: {e}", key_path.display()))?;
        let key =
            KeyPair::from_pem(&key_pem).map_err(|e| format!("{}: {e}", key_path.display()))?;
        let cert_der = botauth::token::cert_der(&cert_pem)?;
        let not_before = X509Certificate::from_der(&cert_der)
            .map_err(|e| format!("{}: {e}", cert_path.display()))?
            .1
            .validity()
            .not_before
            .timestamp();
        Ok(Ca {
            cert_pem,
            cert_der,
            key,
            not_before,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Checks a CSR against the name the request was made for.
    pub fn check_csr(
        csr_pem: &str,
        dns_name: &str,
    ) -> Result<CertificateSigningRequestParams, String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("the CSR does not parse or its signature is invalid: {e}"))?;
        let cn = csr
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .map(|v| match v {
                DnValue::PrintableString(s) => s.to_string(),
                DnValue::Utf8String(s) => s.clone(),
                other => format!("{other:?}"),
            });
        if cn.as_deref() != Some(dns_name) {
            return Err(format!(
                "the CSR's subject CN is {:?} but this request is for {dns_name:?}; make the CSR with genbotcert -bot-hostname for this hostname",
                cn.unwrap_or_default()
            ));
        }
        let sans: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::DnsName(n) => n.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if sans != [dns_name.to_string()] {
            return Err(format!(
                "the CSR's subject alternative names are {sans:?}; exactly [{dns_name:?}] is required"
            ));
        }
        Ok(csr)
    }

    /// Signs a checked CSR for `days` days.
    pub fn sign(&self, csr_pem: &str, dns_name: &str, days: i64) -> Result<Issued, String> {
        let mut csr = Self::check_csr(csr_pem, dns_name)?;
        let mut serial = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut serial);
        serial[0] &= 0x7f;
        serial[0] |= 0x01;
        csr.params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let now = time_now();
        // Five minutes of slack for a machine whose clock is a little behind,
        // but never before the CA itself existed.
        let not_before = (now.unix_timestamp() - 300).max(self.not_before);
        csr.params.not_before =
            ::time::OffsetDateTime::from_unix_timestamp(not_before).map_err(|e| e.to_string())?;
        csr.params.not_after = now + ::time::Duration::days(days);
        csr.params.use_authority_key_identifier_extension = true;
        csr.params.is_ca = rcgen::IsCa::ExplicitNoCa;
        csr.params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        csr.params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let issuer = Issuer::from_ca_cert_der(&self.cert_der.clone().into(), &self.key)
            .map_err(|e| e.to_string())?;
        let cert = csr
            .signed_by(&issuer)
            .map_err(|e| format!("signing: {e}"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            serial: hex::encode(serial),
            not_after: csr.params.not_after.unix_timestamp(),
        })
    }

    /// Signs an arbitrary certificate (tests use it for expired certificates).
    #[doc(hidden)]
    pub fn sign_with_validity(
        &self,
        csr_pem: &str,
        dns_name: &str,
        not_before: i64,
        not_after: i64,
    ) -> Result<Issued, String> {
        let mut csr = Self::check_csr(csr_pem, dns_name)?;
        let serial: [u8; 8] = rand::random();
        csr.params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        csr.params.not_before =
            ::time::OffsetDateTime::from_unix_timestamp(not_before).map_err(|e| e.to_string())?;
        csr.params.not_after =
            ::time::OffsetDateTime::from_unix_timestamp(not_after).map_err(|e| e.to_string())?;
        csr.params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_ca_cert_der(&self.cert_der.clone().into(), &self.key)
            .map_err(|e| e.to_string())?;
        let cert = csr
            .signed_by(&issuer)
            .map_err(|e| format!("signing: {e}"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            serial: hex::encode(serial),
            not_after,
        })
    }

    /// True when `cert` carries a valid signature by this CA.
    pub fn issued(&self, cert: &X509Certificate<'_>) -> bool {
        let Ok((_, ca)) = X509Certificate::from_der(&self.cert_der) else {
            return false;
        };
        cert.verify_signature(Some(ca.public_key())).is_ok()
    }
}

fn time_now() -> ::time::OffsetDateTime {
    ::time::OffsetDateTime::now_utc()
}
