//! The parts of the config about living with a forge: HTTPS credentials of
//! a repo, its forge (webhooks, commit statuses), who hears when a branch
//! breaks, the SMTP server that tells them, and the secrets all of these
//! name instead of holding.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::raw::{Ctx, Entry, Table, join};
use crate::secrets::{self, Source};

/// How the farm authenticates to an `https://` remote and whom it trusts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoAuth {
    /// Sent with the password (forges take any name with a token).
    pub username: String,
    /// `secret:NAME`: the password or access token.
    pub password: Option<String>,
    /// A file holding the password (for farms that keep it elsewhere).
    pub password_file: Option<PathBuf>,
    /// The certificate authorities (PEM) to trust instead of the system's,
    /// for a forge with a private CA.
    pub ca_file: Option<PathBuf>,
}

/// The forge products farmer talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgeKind {
    GitHub,
    /// Gitea and Forgejo (same hooks and status API).
    Gitea,
    GitLab,
}

impl ForgeKind {
    /// The forge a name in the config or a webhook's path means (Forgejo
    /// is Gitea's fork, with the same hooks and API).
    pub fn from_name(name: &str) -> Option<ForgeKind> {
        match name {
            "github" => Some(ForgeKind::GitHub),
            "gitea" | "forgejo" => Some(ForgeKind::Gitea),
            "gitlab" => Some(ForgeKind::GitLab),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ForgeKind::GitHub => "github",
            ForgeKind::Gitea => "gitea",
            ForgeKind::GitLab => "gitlab",
        }
    }
}

/// `[repos.X.forge]`: where the repo lives, so hooks can be checked and
/// results reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgeConfig {
    pub kind: ForgeKind,
    /// `owner/name` at the forge.
    pub repository: String,
    /// The API's base URL (GitHub's default: `https://api.github.com`).
    pub api: String,
    /// `secret:NAME` the forge signs hooks with; hooks are refused without it.
    pub webhook_secret: Option<String>,
    /// `secret:NAME` of a token allowed to set commit statuses; statuses
    /// are sent only when set.
    pub status_token: Option<String>,
}

/// `[repos.X.notify]`: who hears when a branch goes red, and green again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyConfig {
    /// A URL that receives a JSON POST per change.
    pub webhook: Option<String>,
    /// Addresses mailed through `[smtp]`.
    pub email: Vec<String>,
}

impl NotifyConfig {
    pub fn is_empty(&self) -> bool {
        self.webhook.is_none() && self.email.is_empty()
    }
}

/// `[smtp]`: the mail server notifications go through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpConfig {
    /// `smtp://host:port` (STARTTLS when offered is not attempted: plain),
    /// `smtp+starttls://host:port` or `smtps://host:port`.
    pub server: String,
    pub from: String,
    pub username: Option<String>,
    /// `secret:NAME`.
    pub password: Option<String>,
}

/// Who uses a secret, for the checks made once every section is read.
pub(super) enum SecretUser {
    /// A host type's environment.
    Host(String),
    /// A builder's or one of its steps' environment.
    Builder(String),
    /// Repo credentials, hooks and statuses; `[smtp]`: used by the coordinator.
    Coordinator,
}

/// One `secret:NAME` written in the file.
pub(super) struct SecretUse {
    pub(super) name: String,
    pub(super) at: usize,
    pub(super) path: String,
    pub(super) user: SecretUser,
}

pub(super) const REPO_AUTH_KEYS: &[&str] = &["username", "password", "password_file", "ca_file"];
const FORGE_KEYS: &[&str] = &[
    "type",
    "repository",
    "api",
    "webhook_secret",
    "status_token",
];
const NOTIFY_KEYS: &[&str] = &["webhook", "email"];
const SMTP_KEYS: &[&str] = &["server", "from", "username", "password"];

/// `[secrets]`: `NAME = {}` (a file under the data dir), `{ file = PATH }`
/// or `{ env = "VAR" }`.
pub(super) fn secrets(ctx: &mut Ctx<'_>, t: &Table<'_>) -> BTreeMap<String, Source> {
    let mut out = BTreeMap::new();
    for e in t.entries(ctx) {
        if !secrets::valid_name(e.key) {
            ctx.error(
                Some(e.key_at),
                &e.path,
                format!(
                    "secret name {:?} is not valid: use letters, digits, '-', '_' and '.' (at most 64, not starting with '.')",
                    e.key
                ),
            );
            continue;
        }
        let Some(st) = ctx.table(&e) else { continue };
        st.check_keys(ctx, &["file", "env"], &format!("secret \"{}\"", e.key));
        let file = st.get(ctx, "file").and_then(|f| ctx.string(&f));
        let env = st.get(ctx, "env").and_then(|v| ctx.string(&v));
        let source = match (file, env) {
            (Some(_), Some(_)) => {
                ctx.error(
                    Some(e.at),
                    &e.path,
                    "a secret comes from a file or from an environment variable, not both",
                );
                continue;
            }
            (Some(f), None) => {
                let base = ctx.file().parent().unwrap_or(Path::new(""));
                Source::File(base.join(f))
            }
            (None, Some(v)) if v.is_empty() || v.contains(['=', '\0']) => {
                ctx.error(
                    Some(e.at),
                    &e.path,
                    format!("{v:?} is not an environment variable name"),
                );
                continue;
            }
            (None, Some(v)) => Source::Env(v),
            (None, None) => Source::DataDir,
        };
        out.insert(e.key.to_string(), source);
    }
    out
}

/// A value that must be a secret reference (a password, a token): a
/// plain value would put the credential in the TOML, which is shown and shared.
fn secret_value(ctx: &mut Ctx<'_>, t: &Table<'_>, key: &str, who: &str) -> Option<String> {
    let e = t.get(ctx, key)?;
    let v = ctx.string(&e)?;
    match secrets::reference(&v) {
        Some(name) => {
            record(ctx, name, &e, SecretUser::Coordinator);
            Some(v)
        }
        None => {
            ctx.error(
                Some(e.at),
                &e.path,
                format!(
                    "{who}: {key} must name a secret (\"secret:NAME\", declared in [secrets]) so the \
                     value never sits in this file"
                ),
            );
            None
        }
    }
}

/// Notes a `secret:NAME` for the cross-reference checks.
pub(super) fn record(ctx: &mut Ctx<'_>, name: &str, e: &Entry<'_>, user: SecretUser) {
    ctx.secret_uses.push(SecretUse {
        name: name.to_string(),
        at: e.at,
        path: e.path.clone(),
        user,
    });
}

pub(super) fn repo_auth(ctx: &mut Ctx<'_>, t: &Table<'_>, who: &str, url: &str) -> RepoAuth {
    let username = t
        .get(ctx, "username")
        .and_then(|e| ctx.string(&e))
        .unwrap_or_else(|| "git".to_string());
    let password = secret_value(ctx, t, "password", who);
    let base = ctx.file().parent().unwrap_or(Path::new("")).to_path_buf();
    let path_of = |ctx: &mut Ctx<'_>, key: &str| {
        let e = t.get(ctx, key)?;
        let v = ctx.string(&e)?;
        Some(base.join(v))
    };
    let password_file = path_of(ctx, "password_file");
    let ca_file = path_of(ctx, "ca_file");
    let auth = RepoAuth {
        username,
        password,
        password_file,
        ca_file,
    };
    let https = url.to_ascii_lowercase().starts_with("https://");
    if auth.password.is_some() && auth.password_file.is_some() {
        ctx.error(
            t.get(ctx, "password_file").map(|e| e.at),
            &join(&t.path, "password_file"),
            format!("{who}: give password or password_file, not both"),
        );
    }
    let used = REPO_AUTH_KEYS.iter().find(|k| t.get(ctx, k).is_some());
    if let Some(k) = used
        && !https
    {
        ctx.error(
            t.get(ctx, k).map(|e| e.at),
            &join(&t.path, k),
            format!("{who}: {k} is for https:// remotes; this repo's url is not one"),
        );
    }
    auth
}

pub(super) fn forge(ctx: &mut Ctx<'_>, e: &Entry<'_>, who: &str) -> Option<ForgeConfig> {
    let t = ctx.table(e)?;
    t.check_keys(ctx, FORGE_KEYS, &format!("{who}'s forge"));
    let kind = match t.get(ctx, "type") {
        Some(k) => ctx.string(&k).and_then(|name| {
            let kind = ForgeKind::from_name(&name);
            if kind.is_none() {
                ctx.error(
                    Some(k.at),
                    &k.path,
                    format!("{who}: forge type {name:?} is unknown; known: github, gitea, forgejo, gitlab"),
                );
            }
            kind
        }),
        None => {
            ctx.error(
                t.at,
                &join(&t.path, "type"),
                format!("{who}: the forge's type is required: github, gitea, forgejo or gitlab"),
            );
            None
        }
    };
    let repository = t.get(ctx, "repository").and_then(|r| {
        let v = ctx.string(&r)?;
        let ok = v.split('/').count() >= 2
            && v.split('/').all(|p| {
                !p.is_empty()
                    && p != ".."
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            });
        if !ok {
            ctx.error(
                Some(r.at),
                &r.path,
                format!("{who}: forge repository {v:?} must be OWNER/NAME as the forge spells it"),
            );
            return None;
        }
        Some(v)
    });
    let api = t.get(ctx, "api").and_then(|a| {
        let v = ctx.string(&a)?;
        if !is_http_url(&v) {
            ctx.error(
                Some(a.at),
                &a.path,
                format!("{who}: forge api {v:?} must be an http(s) URL"),
            );
            return None;
        }
        Some(v.trim_end_matches('/').to_string())
    });
    let webhook_secret = secret_value(ctx, &t, "webhook_secret", who);
    let status_token = secret_value(ctx, &t, "status_token", who);
    if let (Some(a), Some(_)) = (&api, &status_token)
        && !a.starts_with("https://")
        && !is_loopback_url(a)
    {
        ctx.error(
            t.get(ctx, "api").map(|e| e.at),
            &join(&t.path, "api"),
            format!(
                "{who}: the status token would cross the network in the clear; use an https:// api"
            ),
        );
    }
    let kind = kind?;
    if status_token.is_some() && kind == ForgeKind::GitLab {
        ctx.error(
            t.get(ctx, "status_token").map(|e| e.at),
            &join(&t.path, "status_token"),
            format!("{who}: commit statuses are sent to GitHub and Gitea/Forgejo; GitLab's are not supported yet"),
        );
    }
    let api = match (api, kind) {
        (Some(a), _) => a,
        (None, ForgeKind::GitHub) => "https://api.github.com".to_string(),
        (None, _) if status_token.is_some() => {
            ctx.error(
                t.at,
                &join(&t.path, "api"),
                format!("{who}: api is required to send statuses to this forge, e.g. \"https://gitea.example.com/api/v1\""),
            );
            String::new()
        }
        (None, _) => String::new(),
    };
    if status_token.is_some() && repository.is_none() {
        ctx.error(
            t.at,
            &join(&t.path, "repository"),
            format!("{who}: repository (OWNER/NAME) is required to send commit statuses"),
        );
    }
    Some(ForgeConfig {
        kind,
        repository: repository.unwrap_or_default(),
        api,
        webhook_secret,
        status_token,
    })
}

pub(super) fn notify(ctx: &mut Ctx<'_>, e: &Entry<'_>, who: &str) -> NotifyConfig {
    let Some(t) = ctx.table(e) else {
        return NotifyConfig::default();
    };
    t.check_keys(ctx, NOTIFY_KEYS, &format!("{who}'s notify"));
    let webhook = t.get(ctx, "webhook").and_then(|w| {
        let v = ctx.string(&w)?;
        if !is_http_url(&v) {
            ctx.error(
                Some(w.at),
                &w.path,
                format!("{who}: notify webhook {v:?} must be an http(s) URL"),
            );
            return None;
        }
        Some(v)
    });
    let mut email = Vec::new();
    if let Some(m) = t.get(ctx, "email")
        && let Some(list) = ctx.string_list(&m)
    {
        for a in list {
            if a.value.parse::<lettre::Address>().is_err() {
                ctx.error(
                    Some(a.at),
                    &a.path,
                    format!("{who}: {:?} is not an email address", a.value),
                );
            } else {
                email.push(a.value);
            }
        }
    }
    NotifyConfig { webhook, email }
}

pub(super) fn smtp(ctx: &mut Ctx<'_>, t: &Table<'_>) -> Option<SmtpConfig> {
    t.check_keys(ctx, SMTP_KEYS, "[smtp]");
    let server = match t.get(ctx, "server") {
        Some(s) => ctx.string(&s).and_then(|v| {
            let ok = ["smtp://", "smtps://", "smtp+starttls://"]
                .iter()
                .any(|p| v.starts_with(p));
            if !ok {
                ctx.error(
                    Some(s.at),
                    &s.path,
                    format!("[smtp] server {v:?} must be smtp://HOST:PORT, smtp+starttls://HOST:PORT or smtps://HOST:PORT"),
                );
                return None;
            }
            Some(v)
        }),
        None => {
            ctx.error(t.at, "smtp.server", "[smtp] server is required");
            None
        }
    };
    let from = match t.get(ctx, "from") {
        Some(f) => ctx.string(&f).and_then(|v| {
            if v.parse::<lettre::message::Mailbox>().is_err() {
                ctx.error(
                    Some(f.at),
                    &f.path,
                    format!("[smtp] from {v:?} is not an email address"),
                );
                return None;
            }
            Some(v)
        }),
        None => {
            ctx.error(
                t.at,
                "smtp.from",
                "[smtp] from is required (the sender's address)",
            );
            None
        }
    };
    let username = t.get(ctx, "username").and_then(|u| ctx.string(&u));
    let password = secret_value(ctx, t, "password", "[smtp]");
    if let Some(sv) = &server
        && password.is_some()
        && sv.starts_with("smtp://")
        && !is_loopback_url(sv)
    {
        ctx.error(
            t.get(ctx, "server").map(|e| e.at),
            "smtp.server",
            "[smtp] a password over smtp:// would cross the network in the clear; use smtp+starttls:// or smtps://",
        );
    }
    Some(SmtpConfig {
        server: server?,
        from: from?,
        username,
        password,
    })
}

/// Whether a value is an http(s) URL (the farm's, a forge API's, a
/// notification webhook's).
pub(super) fn is_http_url(v: &str) -> bool {
    v.starts_with("https://") || v.starts_with("http://")
}

/// Whether a URL's host is this machine (where plain text stays local).
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
