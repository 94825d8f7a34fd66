//! What a forge's webhook says, in one shape for every forge: the
//! repository it is about, and whether it is a push, a pull request to
//! build, or something farmer does not act on. Payloads are read as the
//! forges document them (GitHub's `push`/`pull_request`, Gitea's and
//! Forgejo's same-named events, GitLab's `Push Hook`/`Merge Request Hook`).

use http::HeaderMap;
use serde_json::Value;

use crate::config::ForgeKind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The forge checking the hook works (GitHub's `ping`).
    Ping,
    /// Commits pushed to a branch.
    Push { branch: String },
    /// A pull (merge) request opened or updated: its head is to be built.
    PullRequest {
        number: u64,
        head: String,
        /// The branch it would merge into.
        base: String,
        author: String,
    },
    /// Understood, but nothing to do (a closed PR, a label, another event).
    Ignored(String),
}

/// The event header each forge sends.
pub fn event_header(kind: ForgeKind) -> &'static str {
    match kind {
        ForgeKind::GitHub => "X-GitHub-Event",
        ForgeKind::Gitea => "X-Gitea-Event",
        ForgeKind::GitLab => "X-Gitlab-Event",
    }
}

/// A header's value as text, at most 100 characters ("" when absent).
fn header(headers: &HeaderMap, names: &[&str]) -> String {
    names
        .iter()
        .find_map(|n| headers.get(*n).and_then(|v| v.to_str().ok()))
        .map(|s| s.chars().take(100).collect())
        .unwrap_or_default()
}

/// The event's name as the forge's header says it ("" when it says none).
pub fn name(kind: ForgeKind, headers: &HeaderMap) -> String {
    header(headers, &[event_header(kind), "X-Forgejo-Event"])
}

/// The forge's id of this delivery ("" when it sends none).
pub fn delivery_id(kind: ForgeKind, headers: &HeaderMap) -> String {
    match kind {
        ForgeKind::GitHub => header(headers, &["X-GitHub-Delivery"]),
        ForgeKind::Gitea => header(headers, &["X-Gitea-Delivery", "X-Forgejo-Delivery"]),
        ForgeKind::GitLab => header(headers, &["X-Gitlab-Event-UUID", "X-Gitlab-Webhook-UUID"]),
    }
}

/// `OWNER/NAME` of the repository the payload is about, if it says.
pub fn repository(kind: ForgeKind, payload: &Value) -> Option<String> {
    match kind {
        ForgeKind::GitLab => payload.pointer("/project/path_with_namespace"),
        _ => payload.pointer("/repository/full_name"),
    }
    .and_then(Value::as_str)
    .map(str::to_string)
}

/// What the delivery asks of the farm, or why its payload is not the
/// shape its event promises.
pub fn parse(kind: ForgeKind, name: &str, p: &Value) -> Result<Event, String> {
    let s = |ptr: &str| p.pointer(ptr).and_then(Value::as_str);
    let need = |ptr: &str| {
        s(ptr)
            .map(str::to_string)
            .ok_or_else(|| format!("the {name} payload has no {ptr}"))
    };
    let branch_of = |r: String| -> Result<String, String> {
        Ok(r.strip_prefix("refs/heads/").unwrap_or(&r).to_string())
    };
    match (kind, name) {
        (ForgeKind::GitHub, "ping") => Ok(Event::Ping),
        (ForgeKind::GitHub | ForgeKind::Gitea, "push") | (ForgeKind::GitLab, "Push Hook") => {
            let r = need("/ref")?;
            if !r.starts_with("refs/heads/") {
                return Ok(Event::Ignored(format!("push to {r}, not a branch")));
            }
            Ok(Event::Push {
                branch: branch_of(r)?,
            })
        }
        (ForgeKind::GitHub | ForgeKind::Gitea, "pull_request") => {
            let action = need("/action")?;
            let builds = match kind {
                ForgeKind::GitHub => {
                    matches!(action.as_str(), "opened" | "synchronize" | "reopened")
                }
                _ => matches!(action.as_str(), "opened" | "synchronized" | "reopened"),
            };
            if !builds {
                return Ok(Event::Ignored(format!("pull request {action}")));
            }
            let number = p
                .pointer("/pull_request/number")
                .or_else(|| p.pointer("/number"))
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("the {name} payload has no pull request number"))?;
            Ok(Event::PullRequest {
                number,
                head: need("/pull_request/head/sha")?,
                base: need("/pull_request/base/ref")?,
                author: s("/pull_request/user/login").unwrap_or("").to_string(),
            })
        }
        (ForgeKind::GitLab, "Merge Request Hook") => {
            let action = s("/object_attributes/action").unwrap_or("");
            if !matches!(action, "open" | "update" | "reopen") {
                return Ok(Event::Ignored(format!("merge request {action}")));
            }
            let number = p
                .pointer("/object_attributes/iid")
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("the {name} payload has no /object_attributes/iid"))?;
            Ok(Event::PullRequest {
                number,
                head: need("/object_attributes/last_commit/id")?,
                base: need("/object_attributes/target_branch")?,
                author: s("/user/username").unwrap_or("").to_string(),
            })
        }
        (_, "") => Err(format!("the request has no {} header", event_header(kind))),
        (_, other) => Ok(Event::Ignored(format!(
            "event {other:?} is not one farmer acts on"
        ))),
    }
}

/// The ref a pull request's head is published at on the forge.
pub fn pull_ref(kind: ForgeKind, number: u64) -> String {
    match kind {
        ForgeKind::GitLab => format!("refs/merge-requests/{number}/head"),
        _ => format!("refs/pull/{number}/head"),
    }
}
