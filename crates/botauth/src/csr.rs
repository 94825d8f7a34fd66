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

/// A new key (PKCS#8 v1 PEM, see [`ed25519_pkcs8_v1`]) and CSR (PEM).
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
    let key = match key_type {
        KeyType::Ed25519 => portable_ed25519(&key)?,
        KeyType::P256 => key,
    };
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

/// DER of an Ed25519 PKCS#8 v1 private key (RFC 8410 §7) up to the seed:
/// SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (32) } }.
const ED25519_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Re-encodes an Ed25519 PKCS#8 key as v1 (seed only), the form every tool
/// reads.
///
/// `ring` (rcgen's backend) writes v2 (RFC 5958 `OneAsymmetricKey` version 1
/// with the `[1]` public key), which OpenSSL 3.0 (`openssl pkey`: "unsupported")
/// and Python's cryptography ("extra data") refuse. v1 carries the same
/// seed, so nothing is lost: the public key is derived from it. A v1 key is
/// returned unchanged; anything else is `None`.
pub fn ed25519_pkcs8_v1(der: &[u8]) -> Option<Vec<u8>> {
    if der.len() == 48 && der[..16] == ED25519_V1_PREFIX {
        return Some(der.to_vec());
    }
    // v2 as ring writes it: the same fields with version 1, then
    // `[1] IMPLICIT BIT STRING` (0x81 0x21 0x00 + 32 bytes).
    let v2_head = [0x30, 0x51, 0x02, 0x01, 0x01];
    if der.len() != 83 || der[..5] != v2_head || der[5..16] != ED25519_V1_PREFIX[5..] {
        return None;
    }
    let mut out = ED25519_V1_PREFIX.to_vec();
    out.extend_from_slice(der.get(16..48)?);
    Some(out)
}

/// The same key as `key`, held in its v1 encoding so `serialize_pem` writes
/// v1; checked by comparing the public keys.
fn portable_ed25519(key: &rcgen::KeyPair) -> Result<rcgen::KeyPair, String> {
    let v1 = ed25519_pkcs8_v1(key.serialized_der())
        .ok_or("rcgen wrote an Ed25519 key in an unexpected encoding")?;
    let again = rcgen::KeyPair::try_from(v1).map_err(|e| format!("re-reading the key: {e}"))?;
    if again.public_key_raw() != key.public_key_raw() {
        return Err("the re-encoded Ed25519 key has another public key".into());
    }
    Ok(again)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ed25519_keys_are_written_as_pkcs8_v1() {
        let g = generate("linux-x", "x.test", KeyType::Ed25519).unwrap();
        let der = rcgen::KeyPair::from_pem(&g.key_pem)
            .unwrap()
            .serialized_der()
            .to_vec();
        assert_eq!(der.len(), 48);
        assert_eq!(der[..16], ED25519_V1_PREFIX);
        // Idempotent, and other shapes are refused rather than mangled.
        assert_eq!(ed25519_pkcs8_v1(&der), Some(der.clone()));
        assert_eq!(ed25519_pkcs8_v1(&der[..40]), None);
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert_eq!(ed25519_pkcs8_v1(p256.serialized_der()), None);
    }

    #[test]
    fn v2_keys_convert_to_the_same_key() {
        let v2 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert_eq!(v2.serialized_der().len(), 83, "rcgen no longer writes v2?");
        let v1 = rcgen::KeyPair::try_from(ed25519_pkcs8_v1(v2.serialized_der()).unwrap()).unwrap();
        assert_eq!(v1.public_key_raw(), v2.public_key_raw());
    }
}
