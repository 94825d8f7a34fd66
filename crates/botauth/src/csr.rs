//! `genbotcert`: a private key and a CSR for one machine.
//!
//! The CSR's subject CN and its single DNS SAN are both the bot's certified
//! name (`<hostname>.<bot domain>`); the coordinator signs it only if both
//! match the builder request exactly.

use crate::hostname;

/// The key algorithm of a new bot key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Ed25519,
    P256,
}

impl std::str::FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ed25519" => Ok(KeyType::Ed25519),
            "p256" | "ecdsa-p256" => Ok(KeyType::P256),
            _ => Err(format!("unknown key type {s:?}: use ed25519 or p256")),
        }
    }
}

/// A new key (PKCS#8 PEM) and CSR (PEM).
pub struct Generated {
    pub key_pem: String,
    pub csr_pem: String,
    pub dns_name: String,
}

pub fn generate(host: &str, domain: &str, key_type: KeyType) -> Result<Generated, String> {
    hostname::validate(host)?;
    let dns_name = hostname::bot_dns_name(host, domain);
    let alg = match key_type {
        KeyType::Ed25519 => &rcgen::PKCS_ED25519,
        KeyType::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
    };
    let key = rcgen::KeyPair::generate_for(alg).map_err(|e| format!("generating a key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(vec![dns_name.clone()])
        .map_err(|e| format!("bot name {dns_name:?}: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, dns_name.clone());
    let csr = params
        .serialize_request(&key)
        .map_err(|e| format!("making the CSR: {e}"))?;
    Ok(Generated {
        key_pem: key.serialize_pem(),
        csr_pem: csr.pem().map_err(|e| format!("encoding the CSR: {e}"))?,
        dns_name,
    })
}
