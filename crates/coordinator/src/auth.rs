//! The one admin check of the HTTP API: every endpoint that changes the
//! farm asks [`admin`] and answers the same way — `401` when no token was
//! sent, `403` when a wrong one was — so clients (the dashboard's script,
//! `farmer request`, curl) can tell "log in" from "not you".

use axum::Json;
use axum::extract::FromRequestParts;
use http::request::Parts;
use http::{HeaderMap, StatusCode, header};
use subtle::ConstantTimeEq;

/// State that knows the admin token (the farm).
pub trait AdminToken {
    fn admin_token(&self) -> &str;
}

/// An extractor for admin-only handlers: the request carried the admin
/// token. It reads only the headers, so it answers before any body
/// extractor looks at the body — a stranger learns nothing about what
/// the body should have been.
pub struct Admin;

impl<S: AdminToken + Send + Sync> FromRequestParts<S> for Admin {
    type Rejection = (StatusCode, Json<serde_json::Value>);

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        admin(&parts.headers, state.admin_token())
            .map(|()| Admin)
            .map_err(|r| {
                (
                    r.status(),
                    Json(serde_json::json!({ "error": r.to_string() })),
                )
            })
    }
}

/// State that can look up a user by the SHA-256 of their bearer token.
pub trait UserTokens: AdminToken {
    fn user_by_token_sha256(
        &self,
        sha256_hex: String,
    ) -> impl std::future::Future<Output = Option<(String, bool)>> + Send;
}

/// An extractor for the gomote API: who is calling. A user's token (from
/// `farmer user add`) names the user; the farm's admin token is the user
/// `admin` with admin rights. Like [`Admin`], it reads only headers: `401`
/// without a token, `403` with one nobody holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub admin: bool,
}

/// The user name the farm's admin token acts as.
pub const ADMIN_USER: &str = "admin";

impl<S: UserTokens + Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = (StatusCode, Json<serde_json::Value>);

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let refuse =
            |status: StatusCode, msg: &str| (status, Json(serde_json::json!({ "error": msg })));
        match admin(&parts.headers, state.admin_token()) {
            Ok(()) => {
                return Ok(Caller {
                    name: ADMIN_USER.to_string(),
                    admin: true,
                });
            }
            Err(AdminRefusal::Missing) => {
                return Err(refuse(
                    StatusCode::UNAUTHORIZED,
                    "this needs the admin token or a user token: send Authorization: Bearer TOKEN, or run `farmer gomote login --coordinator URL --token-file FILE` (an admin makes user tokens with `farmer user add NAME`)",
                ));
            }
            Err(AdminRefusal::Wrong) => {}
        }
        let sent = bearer(&parts.headers).unwrap_or_default();
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(sent.as_bytes()));
        match state.user_by_token_sha256(sha).await {
            Some((name, admin)) => Ok(Caller { name, admin }),
            None => Err(refuse(
                StatusCode::FORBIDDEN,
                "wrong admin token, and this token belongs to no user (it was never issued, or its user was removed)",
            )),
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Why a request is not an admin's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdminRefusal {
    #[error(
        "this needs the admin token: send Authorization: Bearer TOKEN (the token is in the data dir's admin.token)"
    )]
    Missing,
    #[error("wrong admin token")]
    Wrong,
}

impl AdminRefusal {
    pub fn status(self) -> StatusCode {
        match self {
            AdminRefusal::Missing => StatusCode::UNAUTHORIZED,
            AdminRefusal::Wrong => StatusCode::FORBIDDEN,
        }
    }
}

/// Whether `headers` carry the admin `token` (compared in constant time).
pub fn admin(headers: &HeaderMap, token: &str) -> Result<(), AdminRefusal> {
    match bearer(headers) {
        Some(t) if bool::from(t.as_bytes().ct_eq(token.as_bytes())) => Ok(()),
        Some(_) => Err(AdminRefusal::Wrong),
        None => Err(AdminRefusal::Missing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn missing_wrong_and_right() {
        assert_eq!(admin(&with(None), "t0k"), Err(AdminRefusal::Missing));
        assert_eq!(
            admin(&with(Some("Basic t0k")), "t0k"),
            Err(AdminRefusal::Missing)
        );
        assert_eq!(
            admin(&with(Some("Bearer nope")), "t0k"),
            Err(AdminRefusal::Wrong)
        );
        assert_eq!(admin(&with(Some("Bearer t0k")), "t0k"), Ok(()));
        assert_eq!(admin(&with(Some("Bearer  t0k ")), "t0k"), Ok(()));
        assert_eq!(AdminRefusal::Missing.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(AdminRefusal::Wrong.status(), StatusCode::FORBIDDEN);
    }
}
