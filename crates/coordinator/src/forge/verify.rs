//! Checking that a webhook request comes from the forge: each forge's own
//! scheme, compared in constant time. GitHub and Gitea/Forgejo sign the
//! body with HMAC-SHA256 of the shared secret (`X-Hub-Signature-256:
//! sha256=HEX`, `X-Gitea-Signature: HEX`, `X-Forgejo-Signature: HEX`), so
//! a body edited after signing is refused; GitLab sends the secret itself
//! (`X-Gitlab-Token`).

use hmac::{Hmac, Mac};
use http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::config::ForgeKind;

type HmacSha256 = Hmac<sha2::Sha256>;

/// Why a delivery is not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unverified {
    #[error("the request carries no {0} header: it is not signed")]
    Unsigned(&'static str),
    #[error("the {0} header is malformed")]
    Malformed(&'static str),
    #[error("the signature in {0} does not match the body and the repo's webhook secret")]
    Mismatch(&'static str),
}

/// Checks `body` as delivered with `headers` by a forge of `kind` sharing
/// `secret`.
pub fn check(
    kind: ForgeKind,
    headers: &HeaderMap,
    body: &[u8],
    secret: &str,
) -> Result<(), Unverified> {
    match kind {
        ForgeKind::GitHub => {
            const H: &str = "X-Hub-Signature-256";
            let v = header(headers, H)?;
            let hex = v.strip_prefix("sha256=").ok_or(Unverified::Malformed(H))?;
            hmac_matches(secret, body, hex, H)
        }
        ForgeKind::Gitea => {
            // Forgejo sends both; Gitea only its own.
            let (h, v) = match header(headers, "X-Forgejo-Signature") {
                Ok(v) => ("X-Forgejo-Signature", v),
                Err(_) => ("X-Gitea-Signature", header(headers, "X-Gitea-Signature")?),
            };
            hmac_matches(secret, body, v, h)
        }
        ForgeKind::GitLab => {
            const H: &str = "X-Gitlab-Token";
            let v = header(headers, H)?;
            if bool::from(v.as_bytes().ct_eq(secret.as_bytes())) {
                Ok(())
            } else {
                Err(Unverified::Mismatch(H))
            }
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, Unverified> {
    let v = headers.get(name).ok_or(Unverified::Unsigned(name))?;
    v.to_str()
        .map(str::trim)
        .map_err(|_| Unverified::Malformed(name))
}

fn hmac_matches(
    secret: &str,
    body: &[u8],
    hex_sig: &str,
    name: &'static str,
) -> Result<(), Unverified> {
    let sig = hex::decode(hex_sig).map_err(|_| Unverified::Malformed(name))?;
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).map_err(|_| Unverified::Mismatch(name))?;
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&sig)
        .map_err(|_| Unverified::Mismatch(name))
}

/// The signature header value a forge would send (for tests and tools).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn each_forge_scheme_accepts_its_signature_and_refuses_edits() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let sig = sign("s3cret-hook", body);
        let gh = headers(&[("X-Hub-Signature-256", &format!("sha256={sig}"))]);
        assert_eq!(check(ForgeKind::GitHub, &gh, body, "s3cret-hook"), Ok(()));
        assert_eq!(
            check(
                ForgeKind::GitHub,
                &gh,
                br#"{"ref":"refs/heads/evil"}"#,
                "s3cret-hook"
            ),
            Err(Unverified::Mismatch("X-Hub-Signature-256"))
        );
        assert_eq!(
            check(ForgeKind::GitHub, &gh, body, "other-secret"),
            Err(Unverified::Mismatch("X-Hub-Signature-256"))
        );
        let bare = headers(&[("X-Hub-Signature-256", &sig)]);
        assert_eq!(
            check(ForgeKind::GitHub, &bare, body, "s3cret-hook"),
            Err(Unverified::Malformed("X-Hub-Signature-256"))
        );
        assert_eq!(
            check(ForgeKind::GitHub, &HeaderMap::new(), body, "s3cret-hook"),
            Err(Unverified::Unsigned("X-Hub-Signature-256"))
        );
        let gitea = headers(&[("X-Gitea-Signature", &sig)]);
        assert_eq!(check(ForgeKind::Gitea, &gitea, body, "s3cret-hook"), Ok(()));
        let forgejo = headers(&[("X-Forgejo-Signature", &sig)]);
        assert_eq!(
            check(ForgeKind::Gitea, &forgejo, body, "s3cret-hook"),
            Ok(())
        );
        let gl = headers(&[("X-Gitlab-Token", "s3cret-hook")]);
        assert_eq!(check(ForgeKind::GitLab, &gl, body, "s3cret-hook"), Ok(()));
        let gl = headers(&[("X-Gitlab-Token", "s3cret-hoo")]);
        assert_eq!(
            check(ForgeKind::GitLab, &gl, body, "s3cret-hook"),
            Err(Unverified::Mismatch("X-Gitlab-Token"))
        );
    }
}
