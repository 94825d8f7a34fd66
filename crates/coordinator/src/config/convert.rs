//! Turns the located tree into [`FarmConfig`], checking every section and the
//! references between them, and recording each problem instead of stopping.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use super::forge::{self, SecretUser};
use super::raw::{At, Ctx, Entry, Located, Raw, Table, join};
use super::{
    BuildConfig, ExecConfig, FarmConfig, FarmSettings, GomoteAccess, HostConfig, MAX_RETRY_FAILED,
    MAX_SHARD_HELPERS, PoolKind, RepoConfig, ServeSettings, Shard, Step, duration,
};
use crate::results::{Format, ResultFiles};

const TOP_KEYS: &[&str] = &[
    "farm", "serve", "repos", "hosts", "builders", "secrets", "smtp", "store", "storage",
];
const SERVE_KEYS: &[&str] = &["listen", "data_dir", "ssh_listen"];
const FARM_KEYS: &[&str] = &[
    "min_buildlet_version",
    "max_attempts",
    "heartbeat",
    "heartbeat_timeout",
    "park_after",
    "local_user",
    "local_sandbox",
    "gomote_idle_timeout",
    "gomote_max_instances",
    "url",
];
const REPO_KEYS: &[&str] = &[
    "url",
    "branches",
    "poll_interval",
    "backfill",
    "username",
    "password",
    "password_file",
    "ca_file",
    "forge",
    "notify",
];
/// Commits of a branch's existing history built at its first poll, by default.
const DEFAULT_BACKFILL: u32 = 50;
/// Most commits of existing history a repo may ask to build.
const MAX_BACKFILL: u32 = 1000;
const HOST_KEYS: &[&str] = &[
    "pool",
    "expected",
    "count",
    "owners",
    "notes",
    "env",
    "dimensions",
    "trusted",
    "buildlet",
    "gomote",
];
/// Keys of an exec host (`pool = "exec"`) besides [`HOST_KEYS`].
const EXEC_KEYS: &[&str] = &[
    "create",
    "destroy",
    "max",
    "min_idle",
    "idle_timeout",
    "register_timeout",
    "create_timeout",
    "destroy_timeout",
    "ephemeral",
];
const BUILDER_KEYS: &[&str] = &[
    "host",
    "env",
    "repos",
    "branches",
    "steps",
    "timeout",
    "presubmit",
    "notes",
    "retry_failed",
];
const STEP_KEYS: &[&str] = &[
    "name",
    "run",
    "command",
    "dir",
    "env",
    "timeout",
    "shard",
    "results",
    "artifacts",
];
const SHARD_KEYS: &[&str] = &["list", "run", "helpers", "try_helpers"];

const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(10 * 60);

pub(super) fn farm_config(ctx: &mut Ctx<'_>, tree: &Raw) -> FarmConfig {
    let root = Table::root(tree);
    root.check_keys(ctx, TOP_KEYS, "the top level");

    let farm = match root.get(ctx, "farm").and_then(|e| ctx.table(&e)) {
        Some(t) => farm_settings(ctx, &t),
        None => FarmSettings::default(),
    };

    let mut serve = match root.get(ctx, "serve").and_then(|e| ctx.table(&e)) {
        Some(t) => serve_settings(ctx, &t),
        None => ServeSettings::default(),
    };
    if let Some(t) = root.get(ctx, "store").and_then(|e| ctx.table(&e)) {
        serve.store = store_location(ctx, &t);
    }
    if let Some(t) = root.get(ctx, "storage").and_then(|e| ctx.table(&e)) {
        serve.storage = storage(ctx, &t);
    }

    let secrets = match root.get(ctx, "secrets").and_then(|e| ctx.table(&e)) {
        Some(t) => forge::secrets(ctx, &t),
        None => BTreeMap::new(),
    };
    let smtp = root
        .get(ctx, "smtp")
        .and_then(|e| ctx.table(&e))
        .and_then(|t| forge::smtp(ctx, &t));

    let mut repos = BTreeMap::new();
    for (e, t) in sections(ctx, &root, "repos") {
        repos.insert(e.key.to_owned(), repo(ctx, &e, &t));
    }
    let mut hosts = BTreeMap::new();
    for (e, t) in sections(ctx, &root, "hosts") {
        hosts.insert(e.key.to_owned(), host(ctx, &e, &t));
    }
    let mut builders = BTreeMap::new();
    let mut refs = Vec::new();
    for (e, t) in sections(ctx, &root, "builders") {
        let (b, r) = builder(ctx, &e, &t);
        refs.push(r);
        builders.insert(e.key.to_owned(), b);
    }
    for r in &refs {
        check_builder_refs(ctx, r, &repos, &hosts);
    }
    check_secret_uses(ctx, &secrets, &hosts, &builders);
    for r in repos.values() {
        if !r.notify.email.is_empty() && smtp.is_none() {
            ctx.error(
                None,
                &format!("repos.{}.notify.email", r.name),
                format!(
                    "repo \"{}\": notify.email needs an [smtp] section (server and from) to send through",
                    r.name
                ),
            );
        }
    }

    FarmConfig {
        path: ctx.file().to_path_buf(),
        farm,
        repos,
        hosts,
        builders,
        serve,
        secrets,
        smtp,
    }
}

/// Every `secret:NAME` must be declared, and a secret reaches a machine
/// only on a trusted host type: an untrusted machine's owner could read it.
fn check_secret_uses(
    ctx: &mut Ctx<'_>,
    secrets: &BTreeMap<String, crate::secrets::Source>,
    hosts: &BTreeMap<String, HostConfig>,
    builders: &BTreeMap<String, BuildConfig>,
) {
    let uses = std::mem::take(&mut ctx.secret_uses);
    for u in uses {
        if !secrets.contains_key(&u.name) {
            let declared = defined(secrets.keys(), "no secrets are declared");
            ctx.error(
                Some(u.at),
                &u.path,
                format!(
                    "secret \"{}\" is not declared in [secrets] ({declared}); add `{} = {{}}` there and \
                     set it with `farmer secret set {}`",
                    u.name, u.name, u.name
                ),
            );
            continue;
        }
        let host = match &u.user {
            SecretUser::Coordinator => continue,
            SecretUser::Host(h) => h.clone(),
            SecretUser::Builder(b) => match builders.get(b) {
                Some(b) => b.host_type.clone(),
                None => continue,
            },
        };
        if let Some(h) = hosts.get(&host)
            && !h.trusted
        {
            ctx.error(
                Some(u.at),
                &u.path,
                format!(
                    "secret \"{}\" would be sent to host type {host}, which is not trusted; secrets go \
                     only to trusted host types (trusted = true), since a machine's owner can read \
                     everything its builds receive",
                    u.name
                ),
            );
        }
    }
}

/// `[serve]`: addresses checked as `host:port`, the data dir resolved
/// against the config file's directory.
fn serve_settings(ctx: &mut Ctx<'_>, t: &Table<'_>) -> ServeSettings {
    t.check_keys(ctx, SERVE_KEYS, "[serve]");
    let addr = |ctx: &mut Ctx<'_>, key: &str| {
        let e = t.get(ctx, key)?;
        let v = ctx.string(&e)?;
        if v.rsplit_once(':')
            .is_none_or(|(_, port)| port.parse::<u16>().is_err())
        {
            ctx.error(
                Some(e.at),
                &e.path,
                format!("[serve] {key} = {v:?} is not an address; write HOST:PORT, e.g. \"0.0.0.0:8443\""),
            );
            return None;
        }
        Some(v)
    };
    let listen = addr(ctx, "listen");
    let ssh_listen = addr(ctx, "ssh_listen");
    let data_dir = t.get(ctx, "data_dir").and_then(|e| {
        let v = ctx.string(&e)?;
        if v.trim().is_empty() {
            ctx.error(Some(e.at), &e.path, "[serve] data_dir must not be empty");
            return None;
        }
        let base = ctx.file().parent().unwrap_or(Path::new(""));
        Some(std::path::absolute(base.join(&v)).unwrap_or_else(|_| base.join(&v)))
    });
    ServeSettings {
        listen,
        data_dir,
        ssh_listen,
        store: None,
        storage: None,
    }
}

/// `[storage]`: an S3-compatible bucket for artifacts and logs.
fn storage(ctx: &mut Ctx<'_>, t: &Table<'_>) -> Option<crate::artifacts::StorageConfig> {
    t.check_keys(ctx, &["url", "endpoint", "region"], "[storage]");
    let Some(e) = t.get(ctx, "url") else {
        ctx.error(
            None,
            "storage",
            "[storage] needs url = \"s3://BUCKET/PREFIX\" (leave [storage] out to keep artifacts in the data dir)",
        );
        return None;
    };
    let url = ctx.string(&e)?;
    let endpoint = match t.get(ctx, "endpoint") {
        Some(ep) => {
            let v = ctx.string(&ep)?;
            if !(v.starts_with("http://") || v.starts_with("https://")) {
                ctx.error(
                    Some(ep.at),
                    &ep.path,
                    format!("[storage] endpoint {v:?} must be an http:// or https:// URL"),
                );
                return None;
            }
            Some(v)
        }
        None => None,
    };
    let region = t.get(ctx, "region").and_then(|r| ctx.string(&r));
    let cfg = crate::artifacts::StorageConfig {
        url,
        endpoint,
        region,
    };
    if let Err(msg) = cfg.bucket_prefix() {
        ctx.error(Some(e.at), &e.path, msg);
        return None;
    }
    Some(cfg)
}

/// `[store] url`: checked here, so a typo is reported with its line
/// rather than when the coordinator first connects.
fn store_location(ctx: &mut Ctx<'_>, t: &Table<'_>) -> Option<crate::store::Location> {
    t.check_keys(ctx, &["url"], "[store]");
    let e = t.get(ctx, "url")?;
    let v = ctx.string(&e)?;
    match crate::store::Location::parse(&v) {
        // A relative file is the config file's neighbour, as `data_dir` is.
        Ok(crate::store::Location::Sqlite(p)) => {
            let base = ctx.file().parent().unwrap_or(Path::new(""));
            Some(crate::store::Location::Sqlite(base.join(p)))
        }
        Ok(l) => Some(l),
        Err(msg) => {
            ctx.error(Some(e.at), &e.path, format!("[store] url: {msg}"));
            None
        }
    }
}

/// The named sub-tables of a top-level table such as `[hosts]`.
fn sections<'t>(ctx: &mut Ctx<'_>, root: &Table<'t>, key: &str) -> Vec<(Entry<'t>, Table<'t>)> {
    let Some(table) = root.get(ctx, key).and_then(|e| ctx.table(&e)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in table.entries(ctx) {
        if let Some(t) = ctx.table(&e) {
            out.push((e, t));
        }
    }
    out
}

fn farm_settings(ctx: &mut Ctx<'_>, t: &Table<'_>) -> FarmSettings {
    t.check_keys(ctx, FARM_KEYS, "[farm]");
    let mut s = FarmSettings::default();
    if let Some(v) = t
        .get(ctx, "min_buildlet_version")
        .and_then(|e| ctx.uint(&e))
    {
        s.min_buildlet_version = v;
    }
    if let Some(e) = t.get(ctx, "max_attempts") {
        match ctx.uint(&e) {
            Some(0) => ctx.error(
                Some(e.at),
                &e.path,
                "max_attempts must be at least 1 (the first attempt counts)",
            ),
            Some(v) => s.max_attempts = v,
            None => {}
        }
    }
    if let Some(e) = t.get(ctx, "local_user") {
        match ctx.string(&e) {
            Some(u) if !u.trim().is_empty() => s.local_user = u,
            Some(_) => ctx.error(Some(e.at), &e.path, "local_user must name a user"),
            None => {}
        }
    }
    if let Some(e) = t.get(ctx, "url")
        && let Some(u) = ctx.string(&e)
    {
        if forge::is_http_url(&u) {
            s.url = Some(u.trim_end_matches('/').to_string());
        } else {
            ctx.error(
                Some(e.at),
                &e.path,
                format!("url {u:?} must be the farm's public http(s) URL, e.g. \"https://farm.example.com\""),
            );
        }
    }
    if let Some(v) = t.get(ctx, "local_sandbox").and_then(|e| ctx.boolean(&e)) {
        s.local_sandbox = v;
    }
    if let Some(e) = t.get(ctx, "gomote_idle_timeout") {
        match ctx.duration(&e) {
            Some(d) if d < Duration::from_secs(10) => ctx.error(
                Some(e.at),
                &e.path,
                "gomote_idle_timeout must be at least 10s, or instances would expire between two commands",
            ),
            Some(d) => s.gomote_idle_timeout = d,
            None => {}
        }
    }
    if let Some(v) = t
        .get(ctx, "gomote_max_instances")
        .and_then(|e| ctx.uint(&e))
    {
        s.gomote_max_instances = v;
    }
    if let Some(e) = t.get(ctx, "park_after") {
        match e.value {
            Raw::Bool(false) => s.park_after = None,
            Raw::Bool(true) => {}
            _ => match ctx.duration(&e) {
                Some(d) if d < Duration::from_secs(1) => ctx.error(
                    Some(e.at),
                    &e.path,
                    "park_after must be at least 1s (or false to keep idle links' sessions open)",
                ),
                Some(d) => s.park_after = Some(d),
                None => {}
            },
        }
    }
    let heartbeat = t.get(ctx, "heartbeat");
    let heartbeat_value = heartbeat.as_ref().and_then(|e| ctx.duration(e));
    let timeout = t.get(ctx, "heartbeat_timeout");
    let timeout_value = timeout.as_ref().and_then(|e| ctx.duration(e));
    s.heartbeat = heartbeat_value.unwrap_or(s.heartbeat);
    s.heartbeat_timeout = timeout_value.unwrap_or(s.heartbeat_timeout);
    // Comparing against a default that stands in for a rejected value would
    // only add a confusing second error.
    let both_valid = heartbeat_value.is_some() == heartbeat.is_some()
        && timeout_value.is_some() == timeout.is_some();
    if both_valid && s.heartbeat_timeout <= s.heartbeat {
        // Point at whichever of the two the admin wrote, preferring the timeout.
        let (at, path) = match (&timeout, &heartbeat) {
            (Some(e), _) | (None, Some(e)) => (Some(e.at), e.path.clone()),
            (None, None) => (t.at, join(&t.path, "heartbeat_timeout")),
        };
        let default_note = if timeout.is_none() {
            ", the default"
        } else {
            ""
        };
        ctx.error(
            at,
            &path,
            format!(
                "heartbeat_timeout ({}{default_note}) must be longer than heartbeat ({}), \
                 or every buildlet would time out between two heartbeats",
                duration::format(s.heartbeat_timeout),
                duration::format(s.heartbeat),
            ),
        );
    }
    s
}

fn repo(ctx: &mut Ctx<'_>, e: &Entry<'_>, t: &Table<'_>) -> RepoConfig {
    let name = e.key;
    let who = format!("repo \"{name}\"");
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        ctx.error(
            Some(e.key_at),
            &e.path,
            format!("repo name {name:?} is not valid: use a non-empty name without spaces"),
        );
    }
    t.check_keys(ctx, REPO_KEYS, &who);

    let url = match t.get(ctx, "url") {
        Some(u) => match ctx.string(&u) {
            Some(s) if s.trim().is_empty() => {
                ctx.error(
                    Some(u.at),
                    &u.path,
                    format!("{who}: url must not be empty; give a git URL or a local path"),
                );
                String::new()
            }
            Some(s) => resolve_url(ctx, &u, &s),
            None => String::new(),
        },
        None => {
            ctx.error(
                t.at,
                &join(&t.path, "url"),
                format!("{who}: url is required: a git URL, or a local path relative to this file"),
            );
            String::new()
        }
    };

    let branches = match t.get(ctx, "branches") {
        Some(b) => match ctx.string_list(&b) {
            Some(list) => {
                if list.is_empty() {
                    ctx.error(
                        Some(b.at),
                        &b.path,
                        format!("{who}: branches must list at least one branch; leave it out to watch \"main\""),
                    );
                }
                let mut seen = BTreeSet::new();
                for branch in &list {
                    if branch.value.is_empty()
                        || branch
                            .value
                            .chars()
                            .any(|c| c.is_whitespace() || c.is_control())
                    {
                        ctx.error(
                            Some(branch.at),
                            &branch.path,
                            format!("{who}: branch name {:?} is not valid", branch.value),
                        );
                    } else if !seen.insert(branch.value.as_str()) {
                        ctx.error(
                            Some(branch.at),
                            &branch.path,
                            format!("{who}: branch \"{}\" is listed twice", branch.value),
                        );
                    }
                }
                list.into_iter().map(|l| l.value).collect()
            }
            None => Vec::new(),
        },
        None => vec!["main".to_owned()],
    };

    let poll_interval =
        optional(ctx, t, "poll_interval", Ctx::duration).unwrap_or(DEFAULT_POLL_INTERVAL);
    let backfill = match t.get(ctx, "backfill") {
        Some(b) => match ctx.uint(&b) {
            Some(n) if n > MAX_BACKFILL => {
                ctx.error(
                    Some(b.at),
                    &b.path,
                    format!("{who}: backfill = {n} is too many; at most {MAX_BACKFILL} commits of existing history"),
                );
                DEFAULT_BACKFILL
            }
            Some(n) => n,
            None => DEFAULT_BACKFILL,
        },
        None => DEFAULT_BACKFILL,
    };
    let auth = forge::repo_auth(ctx, t, &who, &url);
    let forge = t
        .get(ctx, "forge")
        .and_then(|f| forge::forge(ctx, &f, &who));
    let notify = t
        .get(ctx, "notify")
        .map(|n| forge::notify(ctx, &n, &who))
        .unwrap_or_default();
    RepoConfig {
        name: name.to_owned(),
        url,
        branches,
        poll_interval,
        backfill,
        auth,
        forge,
        notify,
    }
}

/// Whether a repo url names a remote (scheme URL or scp-like `user@host:path`)
/// rather than a local path.
fn is_remote(url: &str) -> bool {
    if url.contains("://") {
        return true;
    }
    match url.find(':') {
        Some(colon) => {
            let before = &url[..colon];
            let drive_letter = before.len() == 1 && before.chars().all(|c| c.is_ascii_alphabetic());
            !before.is_empty() && !drive_letter && !before.contains(['/', '\\'])
        }
        None => false,
    }
}

fn resolve_url(ctx: &mut Ctx<'_>, e: &Entry<'_>, url: &str) -> String {
    if is_remote(url) {
        return url.to_owned();
    }
    let base = ctx.file().parent().unwrap_or(Path::new(""));
    match std::path::absolute(base.join(url)) {
        Ok(path) => path.to_string_lossy().into_owned(),
        Err(err) => {
            ctx.error(
                Some(e.at),
                &e.path,
                format!("cannot resolve local repo path \"{url}\": {err}"),
            );
            url.to_owned()
        }
    }
}

fn host(ctx: &mut Ctx<'_>, e: &Entry<'_>, t: &Table<'_>) -> HostConfig {
    let name = e.key;
    let who = format!("host \"{name}\"");
    let valid = name.len() > "host-".len()
        && name.starts_with("host-")
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        ctx.error(
            Some(e.key_at),
            &e.path,
            format!(
                "host type {name:?} is not valid: host types start with \"host-\" and use only \
                 lowercase letters, digits and dashes, e.g. \"host-linux-amd64-alice\""
            ),
        );
    }
    let pool = match t.get(ctx, "pool") {
        Some(p) => match ctx.string(&p).as_deref() {
            Some("reverse") => Some(PoolKind::Reverse),
            Some("local") => Some(PoolKind::Local),
            Some("exec") => Some(PoolKind::Exec),
            Some(other) => {
                ctx.error(
                    Some(p.at),
                    &p.path,
                    format!(
                        "{who}: pool \"{other}\" is not supported; use \"reverse\", \"local\" or \"exec\""
                    ),
                );
                None
            }
            None => None,
        },
        None => {
            ctx.error(
                t.at,
                &join(&t.path, "pool"),
                format!(
                    "{who}: pool is required: \"reverse\" (machines connect to the coordinator), \
                     \"local\" (the coordinator starts buildlets itself) or \"exec\" (machines \
                     created on demand by a command)"
                ),
            );
            None
        }
    };
    let all: Vec<&str> = HOST_KEYS.iter().chain(EXEC_KEYS).copied().collect();
    t.check_keys(ctx, &all, &who);
    if pool.is_some_and(|p| p != PoolKind::Exec) {
        for key in EXEC_KEYS {
            if let Some(e) = t.get(ctx, key) {
                ctx.error(
                    Some(e.key_at),
                    &e.path,
                    format!("{who}: {key} only applies to pool = \"exec\""),
                );
            }
        }
    }
    let exec = (pool == Some(PoolKind::Exec)).then(|| exec(ctx, t, &who));

    let expected_entry = t.get(ctx, "expected");
    let expected = expected_entry
        .as_ref()
        .and_then(|e| ctx.uint(e))
        .unwrap_or(if pool == Some(PoolKind::Exec) { 0 } else { 1 });
    let count_entry = t.get(ctx, "count");
    let count = count_entry.as_ref().and_then(|e| ctx.uint(e));
    let local_count = match pool {
        Some(PoolKind::Local) => {
            let n = count.unwrap_or(expected);
            if n == 0 && (count.is_some() || expected_entry.is_some()) {
                let (at, path) = match (&count_entry, &expected_entry) {
                    (Some(e), _) | (None, Some(e)) => (Some(e.at), e.path.clone()),
                    (None, None) => (t.at, join(&t.path, "count")),
                };
                ctx.error(
                    at,
                    &path,
                    format!("{who}: a local host must start at least one buildlet; set count to 1 or more"),
                );
            }
            n
        }
        Some(PoolKind::Reverse | PoolKind::Exec) => {
            if let Some(c) = &count_entry {
                ctx.error(
                    Some(c.key_at),
                    &c.path,
                    format!(
                        "{who}: count only applies to pool = \"local\"; the number of machines \
                         of a reverse host is set with expected, of an exec host with max and min_idle"
                    ),
                );
            }
            0
        }
        None => 0,
    };

    let local_program = match t.get(ctx, "buildlet") {
        None => Vec::new(),
        Some(e) if pool != Some(PoolKind::Local) => {
            ctx.error(
                Some(e.key_at),
                &e.path,
                format!("{who}: buildlet only applies to pool = \"local\" (the program the coordinator starts)"),
            );
            Vec::new()
        }
        // A string is the program's path.
        Some(e) => command(ctx, &e, &who, |s| vec![s.to_owned()]),
    };
    let owners = optional(ctx, t, "owners", Ctx::string_list).unwrap_or_default();
    for owner in &owners {
        if owner.value.trim().is_empty() {
            ctx.error(
                Some(owner.at),
                &owner.path,
                format!("{who}: an owner must not be empty"),
            );
        }
    }
    let notes = optional(ctx, t, "notes", Ctx::string).unwrap_or_default();
    let env = env(ctx, t, &who, || SecretUser::Host(name.to_owned()));
    let mut dimensions = BTreeMap::new();
    for (key, value) in optional(ctx, t, "dimensions", Ctx::string_map).unwrap_or_default() {
        if key.value.is_empty() {
            ctx.error(
                Some(key.at),
                &key.path,
                format!("{who}: dimension names must not be empty"),
            );
        }
        dimensions.insert(key.value, value);
    }
    let trusted = optional(ctx, t, "trusted", Ctx::boolean).unwrap_or(false);
    let gomote = match t.get(ctx, "gomote") {
        None if pool.is_none_or(|p| p == PoolKind::Reverse) => GomoteAccess::Nobody,
        None => GomoteAccess::Everyone,
        Some(e) => match e.value {
            Raw::Bool(true) => GomoteAccess::Everyone,
            Raw::Bool(false) => GomoteAccess::Nobody,
            _ => match ctx.string_list(&e) {
                Some(list) => {
                    for u in &list {
                        if u.value.trim().is_empty() {
                            ctx.error(
                                Some(u.at),
                                &u.path,
                                format!("{who}: a gomote user must not be empty"),
                            );
                        }
                    }
                    GomoteAccess::Users(list.into_iter().map(|l| l.value).collect())
                }
                None => GomoteAccess::Nobody,
            },
        },
    };

    HostConfig {
        name: name.to_owned(),
        pool: pool.unwrap_or(PoolKind::Reverse),
        expected,
        local_count,
        local_program,
        owners: owners.into_iter().map(|o| o.value).collect(),
        notes,
        env,
        dimensions,
        trusted,
        exec,
        gomote,
    }
}

const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
const DEFAULT_REGISTER_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const DEFAULT_CREATE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
const DEFAULT_DESTROY_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The settings of an exec host.
fn exec(ctx: &mut Ctx<'_>, t: &Table<'_>, who: &str) -> ExecConfig {
    let create = hook(ctx, t, "create", who);
    let destroy = hook(ctx, t, "destroy", who);
    let max = match t.get(ctx, "max") {
        Some(e) => match ctx.uint(&e) {
            Some(0) => {
                ctx.error(
                    Some(e.at),
                    &e.path,
                    format!("{who}: max must be at least 1"),
                );
                1
            }
            Some(n) => n,
            None => 1,
        },
        None => {
            ctx.error(
                t.at,
                &join(&t.path, "max"),
                format!("{who}: an exec host needs max = N, the most machines it may run at once"),
            );
            1
        }
    };
    let min_idle_entry = t.get(ctx, "min_idle");
    let min_idle = min_idle_entry
        .as_ref()
        .and_then(|e| ctx.uint(e))
        .unwrap_or(0);
    if let Some(e) = min_idle_entry.as_ref().filter(|_| min_idle > max) {
        ctx.error(
            Some(e.at),
            &e.path,
            format!("{who}: min_idle ({min_idle}) must not exceed max ({max})"),
        );
    }
    let dur = |ctx: &mut Ctx<'_>, key: &str, default: Duration| {
        optional(ctx, t, key, Ctx::duration).unwrap_or(default)
    };
    ExecConfig {
        create,
        destroy,
        max,
        min_idle,
        idle_timeout: dur(ctx, "idle_timeout", DEFAULT_IDLE_TIMEOUT),
        register_timeout: dur(ctx, "register_timeout", DEFAULT_REGISTER_TIMEOUT),
        create_timeout: dur(ctx, "create_timeout", DEFAULT_CREATE_TIMEOUT),
        destroy_timeout: dur(ctx, "destroy_timeout", DEFAULT_DESTROY_TIMEOUT),
        ephemeral: optional(ctx, t, "ephemeral", Ctx::boolean).unwrap_or(false),
    }
}

/// A hook command: a shell string (run with `sh -c`) or a program with
/// its arguments.
fn hook(ctx: &mut Ctx<'_>, t: &Table<'_>, key: &str, who: &str) -> Vec<String> {
    let Some(e) = t.get(ctx, key) else {
        ctx.error(
            t.at,
            &join(&t.path, key),
            format!(
                "{who}: an exec host needs {key} = \"shell command\" or [\"program\", \"arg\", ...]"
            ),
        );
        return Vec::new();
    };
    // A string is a shell command.
    command(ctx, &e, who, |s| {
        vec!["sh".to_owned(), "-c".to_owned(), s.to_owned()]
    })
}

/// A program to run, written as a string (turned into the command line by
/// `from_string`) or as `["program", "arg", ...]`; empty after an error.
fn command(
    ctx: &mut Ctx<'_>,
    e: &Entry<'_>,
    who: &str,
    from_string: impl FnOnce(&str) -> Vec<String>,
) -> Vec<String> {
    let key = e.key;
    match e.value {
        Raw::Str(s) if s.trim().is_empty() => {
            ctx.error(
                Some(e.at),
                &e.path,
                format!("{who}: {key} must not be empty"),
            );
            Vec::new()
        }
        Raw::Str(s) => from_string(s),
        _ => match ctx.string_list(e) {
            Some(list) if list.first().is_none_or(|p| p.value.is_empty()) => {
                ctx.error(
                    Some(e.at),
                    &e.path,
                    format!("{who}: {key} must start with the program to run"),
                );
                Vec::new()
            }
            Some(list) => list.into_iter().map(|l| l.value).collect(),
            None => Vec::new(),
        },
    }
}

/// What a builder refers to, with positions, checked once every section is read.
struct BuilderRefs {
    who: String,
    path: String,
    at: At,
    /// `None` when missing or of the wrong type (already reported).
    host: Option<Located>,
    host_missing: bool,
    repos: Vec<Located>,
    branches: Vec<Located>,
}

fn builder(ctx: &mut Ctx<'_>, e: &Entry<'_>, t: &Table<'_>) -> (BuildConfig, BuilderRefs) {
    let name = e.key;
    let who = format!("builder \"{name}\"");
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_'));
    if !valid {
        ctx.error(
            Some(e.key_at),
            &e.path,
            format!(
                "builder name {name:?} is not valid: use only lowercase letters, digits, dashes, \
                 dots and underscores, e.g. \"linux-amd64\""
            ),
        );
    }
    t.check_keys(ctx, BUILDER_KEYS, &who);

    let host_entry = t.get(ctx, "host");
    let host = host_entry.as_ref().and_then(|h| {
        let value = ctx.string(h)?;
        Some(Located {
            value,
            at: h.at,
            path: h.path.clone(),
        })
    });
    let repos = optional(ctx, t, "repos", Ctx::string_list).unwrap_or_default();
    no_duplicates(ctx, &repos, &who, "repo");
    let branches = optional(ctx, t, "branches", Ctx::string_list).unwrap_or_default();
    no_duplicates(ctx, &branches, &who, "branch");

    let mut steps = Vec::new();
    match t.get(ctx, "steps") {
        Some(s) => {
            if let Some(tables) = ctx.tables(&s) {
                if tables.is_empty() {
                    ctx.error(
                        Some(s.at),
                        &s.path,
                        format!("{who}: steps is empty; a builder needs at least one step"),
                    );
                }
                let mut seen = BTreeMap::new();
                for (i, st) in tables.iter().enumerate() {
                    steps.push(step(ctx, st, name, &who, i, &mut seen));
                }
            }
        }
        None => ctx.error(
            t.at,
            &join(&t.path, "steps"),
            format!(
                "{who}: has no steps; add at least one [[{}.steps]] with a run or command",
                t.path
            ),
        ),
    }

    let env = env(ctx, t, &who, || SecretUser::Builder(name.to_owned()));
    let timeout = optional(ctx, t, "timeout", Ctx::duration).unwrap_or(DEFAULT_BUILD_TIMEOUT);
    let presubmit = optional(ctx, t, "presubmit", Ctx::boolean).unwrap_or(false);
    let notes = optional(ctx, t, "notes", Ctx::string).unwrap_or_default();
    let retry_failed = match t.get(ctx, "retry_failed") {
        Some(e) => match ctx.uint(&e) {
            Some(n) if n > MAX_RETRY_FAILED => {
                ctx.error(
                    Some(e.at),
                    &e.path,
                    format!(
                        "{who}: retry_failed = {n} is too many; at most {MAX_RETRY_FAILED} re-runs of failed tests"
                    ),
                );
                0
            }
            Some(n) => n,
            None => 0,
        },
        None => 0,
    };

    let config = BuildConfig {
        name: name.to_owned(),
        host_type: host.as_ref().map(|h| h.value.clone()).unwrap_or_default(),
        env,
        repos: repos.iter().map(|r| r.value.clone()).collect(),
        branches: branches.iter().map(|b| b.value.clone()).collect(),
        steps,
        timeout,
        presubmit,
        notes,
        retry_failed,
    };
    let refs = BuilderRefs {
        who,
        path: t.path.clone(),
        at: t.at,
        host,
        host_missing: host_entry.is_none(),
        repos,
        branches,
    };
    (config, refs)
}

fn no_duplicates(ctx: &mut Ctx<'_>, list: &[Located], who: &str, what: &str) {
    let mut seen = BTreeSet::new();
    for item in list {
        if !seen.insert(item.value.as_str()) {
            ctx.error(
                Some(item.at),
                &item.path,
                format!("{who}: {what} \"{}\" is listed twice", item.value),
            );
        }
    }
}

fn step(
    ctx: &mut Ctx<'_>,
    t: &Table<'_>,
    builder: &str,
    builder_who: &str,
    index: usize,
    seen: &mut BTreeMap<String, usize>,
) -> Step {
    let mut who = format!("{builder_who}: step #{}", index + 1);
    let name = match t.get(ctx, "name") {
        Some(n) => match ctx.string(&n) {
            Some(name) if name.trim().is_empty() => {
                ctx.error(
                    Some(n.at),
                    &n.path,
                    format!("{who}: name must not be empty"),
                );
                String::new()
            }
            Some(name) => {
                let line = ctx.line(Some(n.at));
                if let Some(first) = seen.get(&name) {
                    ctx.error(
                        Some(n.at),
                        &n.path,
                        format!(
                            "{builder_who}: step name \"{name}\" is already used (line {first}); \
                             step names must be unique within a builder"
                        ),
                    );
                } else {
                    seen.insert(name.clone(), line);
                }
                who = format!("{builder_who}: step \"{name}\"");
                name
            }
            None => String::new(),
        },
        None => {
            ctx.error(
                t.at,
                &join(&t.path, "name"),
                format!("{who}: name is required, e.g. name = \"test\""),
            );
            String::new()
        }
    };
    t.check_keys(ctx, STEP_KEYS, &who);

    let run = t.get(ctx, "run");
    let command_entry = t.get(ctx, "command");
    let shard_entry = t.get(ctx, "shard");
    if let Some(sh) = &shard_entry
        && let Some(other) = run.as_ref().or(command_entry.as_ref())
    {
        let later = if other.key_at > sh.key_at { other } else { sh };
        ctx.error(
            Some(later.key_at),
            &later.path,
            format!(
                "{who}: a sharded step runs shard.run for each unit; \
                 remove {} or shard",
                other.key
            ),
        );
    }
    let shard = shard_entry.as_ref().map(|e| shard(ctx, e, &who));
    let results = match t.get(ctx, "results") {
        Some(e) if shard.is_some() => {
            ctx.error(
                Some(e.key_at),
                &e.path,
                format!(
                    "{who}: results files are not read for a sharded step: its units report their \
                     tests through their output (go test -json, libtest)"
                ),
            );
            Vec::new()
        }
        Some(e) => results(ctx, &e, &who),
        None => Vec::new(),
    };
    let artifacts = match t.get(ctx, "artifacts") {
        Some(e) if shard.is_some() => {
            ctx.error(
                Some(e.key_at),
                &e.path,
                format!("{who}: artifacts are not kept from a sharded step (its units run on several machines); keep them in a step after it"),
            );
            Vec::new()
        }
        Some(e) => artifacts(ctx, &e, &who),
        None => Vec::new(),
    };
    let command = match (&run, &command_entry) {
        _ if shard.is_some() => Vec::new(),
        (Some(r), Some(c)) => {
            let later = if r.key_at > c.key_at { r } else { c };
            ctx.error(
                Some(later.key_at),
                &later.path,
                format!("{who}: set either run or command, not both"),
            );
            Vec::new()
        }
        (Some(r), None) => match ctx.string(r) {
            Some(script) if script.trim().is_empty() => {
                ctx.error(Some(r.at), &r.path, format!("{who}: run must not be empty"));
                Vec::new()
            }
            Some(script) => vec!["sh".to_owned(), "-c".to_owned(), script],
            None => Vec::new(),
        },
        (None, Some(c)) => match ctx.string_list(c) {
            Some(list) if list.is_empty() => {
                ctx.error(
                    Some(c.at),
                    &c.path,
                    format!("{who}: command is empty; it must start with the program to run"),
                );
                Vec::new()
            }
            Some(list) => {
                if list[0].value.is_empty() {
                    ctx.error(
                        Some(list[0].at),
                        &list[0].path,
                        format!("{who}: the program name must not be empty"),
                    );
                }
                list.into_iter().map(|l| l.value).collect()
            }
            None => Vec::new(),
        },
        (None, None) => {
            ctx.error(
                t.at,
                &t.path,
                format!(
                    "{who}: needs run = \"shell command\" or command = [\"program\", \"arg\", ...]"
                ),
            );
            Vec::new()
        }
    };

    let dir = t.get(ctx, "dir").and_then(|d| {
        let dir = ctx.string(&d)?;
        let problem = if dir.is_empty() {
            Some("must not be empty; use \".\" for the source root")
        } else if dir.starts_with(['/', '\\']) || dir.as_bytes().get(1) == Some(&b':') {
            Some("must be relative to the source root")
        } else if dir.split(['/', '\\']).any(|part| part == "..") {
            Some("must not contain \"..\"; steps run inside the source tree")
        } else {
            None
        };
        if let Some(problem) = problem {
            ctx.error(Some(d.at), &d.path, format!("{who}: dir {dir:?} {problem}"));
        }
        Some(dir)
    });
    let env = env(ctx, t, &who, || SecretUser::Builder(builder.to_owned()));
    let timeout = optional(ctx, t, "timeout", Ctx::duration).unwrap_or(DEFAULT_STEP_TIMEOUT);
    Step {
        name,
        command,
        dir,
        env,
        timeout,
        shard: shard.flatten(),
        results,
        artifacts,
    }
}

/// A string or a list of strings.
fn one_or_list(ctx: &mut Ctx<'_>, e: &Entry<'_>) -> Vec<Located> {
    let list = match e.value {
        Raw::Str(_) => ctx.string(e).map(|s| {
            vec![Located {
                value: s,
                at: e.at,
                path: e.path.clone(),
            }]
        }),
        _ => ctx.string_list(e),
    };
    list.unwrap_or_default()
}

/// What is wrong with a glob of files in a step's directory, if anything:
/// it must stay inside the directory.
fn glob_problem(glob: &str) -> Option<&'static str> {
    if glob.is_empty() {
        Some("is empty")
    } else if glob.starts_with(['/', '\\']) || glob.as_bytes().get(1) == Some(&b':') {
        Some("must be relative to the step's directory")
    } else if glob.split('/').any(|p| p == "..") {
        Some("must not contain \"..\"")
    } else {
        None
    }
}

/// Most globs of `artifacts` in one step.
const MAX_ARTIFACT_GLOBS: usize = 16;

/// A step's `artifacts`: a glob or a list of them, relative to the step's
/// directory, never leaving it.
fn artifacts(ctx: &mut Ctx<'_>, e: &Entry<'_>, who: &str) -> Vec<String> {
    let list = one_or_list(ctx, e);
    if list.len() > MAX_ARTIFACT_GLOBS {
        ctx.error(
            Some(e.at),
            &e.path,
            format!(
                "{who}: artifacts has {} globs; at most {MAX_ARTIFACT_GLOBS}",
                list.len()
            ),
        );
        return Vec::new();
    }
    let mut out = Vec::new();
    for item in list {
        let glob = item.value.trim();
        match glob_problem(glob) {
            Some(p) => ctx.error(
                Some(item.at),
                &item.path,
                format!("{who}: artifacts path {glob:?} {p}"),
            ),
            None => out.push(glob.to_string()),
        }
    }
    out
}

/// A step's result files: `"FORMAT:GLOB"` or a list of them, the glob
/// relative to the step's directory.
fn results(ctx: &mut Ctx<'_>, e: &Entry<'_>, who: &str) -> Vec<ResultFiles> {
    let mut out = Vec::new();
    for item in one_or_list(ctx, e) {
        let Some((format, glob)) = item.value.split_once(':') else {
            ctx.error(
                Some(item.at),
                &item.path,
                format!(
                    "{who}: results {:?} needs a format: FORMAT:GLOB, e.g. \"junit:target/*.xml\" (formats: {})",
                    item.value,
                    Format::NAMES.join(", ")
                ),
            );
            continue;
        };
        let Some(format) = Format::parse(format.trim()) else {
            ctx.error(
                Some(item.at),
                &item.path,
                format!(
                    "{who}: results format {format:?} is unknown; known formats: {}",
                    Format::NAMES.join(", ")
                ),
            );
            continue;
        };
        let glob = glob.trim();
        if let Some(p) = glob_problem(glob) {
            ctx.error(
                Some(item.at),
                &item.path,
                format!("{who}: results path {glob:?} {p}"),
            );
            continue;
        }
        out.push(ResultFiles {
            format,
            glob: glob.to_string(),
        });
    }
    out
}

/// The `shard` table of a step: how to list its units and run one, and how
/// many helper machines to ask for. `None` after an error.
fn shard(ctx: &mut Ctx<'_>, e: &Entry<'_>, who: &str) -> Option<Shard> {
    let t = ctx.table(e)?;
    let who = format!("{who}: shard");
    t.check_keys(ctx, SHARD_KEYS, &who);
    let script = |s: &str| vec!["sh".to_owned(), "-c".to_owned(), s.to_owned()];
    let required = |ctx: &mut Ctx<'_>, key: &str, example: &str| match t.get(ctx, key) {
        Some(e) => Some((command(ctx, &e, &who, script), e)),
        None => {
            ctx.error(
                t.at,
                &join(&t.path, key),
                format!("{who}.{key} is required, e.g. shard.{key} = \"{example}\""),
            );
            None
        }
    };
    let list = required(ctx, "list", "go tool dist test -list");
    let run = required(ctx, "run", "go tool dist test -run ^{unit}$");
    // A string runs with `sh -c`; so does a list that names a shell with
    // `-c`: either way `{unit}` lands in a script and is quoted for it.
    if let Some((cmd, e)) = &run
        && super::is_shell_script(cmd)
        && cmd
            .get(2)
            .is_some_and(|script| super::unit_in_quotes(script))
    {
        ctx.error(
            Some(e.at),
            &e.path,
            format!(
                "{who}.run puts {{unit}} inside quotes; the unit's name is quoted for the shell \
                 where it is substituted, so write {{unit}} outside quotes (e.g. -run ^{{unit}}$), \
                 or use \"$FARMER_UNIT\""
            ),
        );
    }
    let count = |ctx: &mut Ctx<'_>, key: &str| {
        let e = t.get(ctx, key)?;
        let n = ctx.uint(&e)?;
        if n > MAX_SHARD_HELPERS {
            ctx.error(
                Some(e.at),
                &e.path,
                format!(
                    "{who}.{key} = {n} is too many; at most {MAX_SHARD_HELPERS} helper machines"
                ),
            );
            return None;
        }
        Some(n)
    };
    let helpers = count(ctx, "helpers").unwrap_or(0);
    let try_helpers = count(ctx, "try_helpers").unwrap_or(helpers);
    let (list, _) = list?;
    let (run, _) = run?;
    if list.is_empty() || run.is_empty() {
        return None;
    }
    Some(Shard {
        list,
        run,
        helpers,
        try_helpers,
    })
}

/// Reads `key` with `read` if present.
fn optional<'c, 't, T>(
    ctx: &mut Ctx<'c>,
    t: &Table<'t>,
    key: &str,
    read: impl FnOnce(&mut Ctx<'c>, &Entry<'t>) -> Option<T>,
) -> Option<T> {
    let e = t.get(ctx, key)?;
    read(ctx, &e)
}

/// The `env` table of a host, builder or step, checked so that every entry
/// can be passed to a process as `NAME=value`.
fn env(
    ctx: &mut Ctx<'_>,
    t: &Table<'_>,
    who: &str,
    user: impl Fn() -> SecretUser,
) -> Vec<(String, String)> {
    let pairs = optional(ctx, t, "env", Ctx::string_map).unwrap_or_default();
    let mut out = Vec::with_capacity(pairs.len());
    for (key, value) in pairs {
        if let Some(name) = crate::secrets::reference(&value) {
            ctx.secret_uses.push(forge::SecretUse {
                name: name.to_string(),
                at: key.at,
                path: key.path.clone(),
                user: user(),
            });
        }
        let problem = if key.value.is_empty() {
            Some("environment variable names must not be empty".to_owned())
        } else if key.value.contains('=') {
            Some(format!(
                "environment variable name {:?} must not contain '='",
                key.value
            ))
        } else if key.value.contains('\0') || value.contains('\0') {
            Some(format!(
                "environment variable {:?} must not contain a NUL character",
                key.value
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            ctx.error(Some(key.at), &key.path, format!("{who}: {problem}"));
        }
        out.push((key.value, value));
    }
    out
}

fn defined<'a>(names: impl Iterator<Item = &'a String>, none: &str) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        none.to_owned()
    } else {
        format!("defined: {}", names.join(", "))
    }
}

fn check_builder_refs(
    ctx: &mut Ctx<'_>,
    r: &BuilderRefs,
    repos: &BTreeMap<String, RepoConfig>,
    hosts: &BTreeMap<String, HostConfig>,
) {
    let who = &r.who;
    let host_list = || {
        defined(
            hosts.keys(),
            "no hosts are defined; add a [hosts.host-...] section",
        )
    };
    if r.host_missing {
        ctx.error(
            r.at,
            &join(&r.path, "host"),
            format!(
                "{who}: host is required: name the host type its machines come from ({})",
                host_list()
            ),
        );
    }
    if let Some(h) = &r.host
        && !hosts.contains_key(&h.value)
    {
        let message = format!(
            "{who}: host \"{}\" is not defined ({})",
            h.value,
            host_list()
        );
        ctx.error(Some(h.at), &h.path, message);
    }

    for repo in &r.repos {
        if !repos.contains_key(&repo.value) {
            let list = defined(
                repos.keys(),
                "no repos are defined; add a [repos.<name>] section",
            );
            ctx.error(
                Some(repo.at),
                &repo.path,
                format!("{who}: repo \"{}\" is not defined ({list})", repo.value),
            );
        }
    }

    // Branches are checked against the repos that exist; undefined ones were reported above.
    let scope: Vec<&RepoConfig> = if r.repos.is_empty() {
        repos.values().collect()
    } else {
        r.repos.iter().filter_map(|l| repos.get(&l.value)).collect()
    };
    if !r.repos.is_empty() && scope.is_empty() {
        return;
    }
    for branch in &r.branches {
        if scope
            .iter()
            .any(|repo| repo.branches.contains(&branch.value))
        {
            continue;
        }
        let which = if r.repos.is_empty() {
            "any repo"
        } else {
            "its repos"
        };
        let watched = if scope.is_empty() {
            "no repos are defined".to_owned()
        } else {
            scope
                .iter()
                .map(|repo| format!("{}: {}", repo.name, repo.branches.join(", ")))
                .collect::<Vec<_>>()
                .join("; ")
        };
        ctx.error(
            Some(branch.at),
            &branch.path,
            format!(
                "{who}: branch \"{}\" is not watched by {which} ({watched}); add it to the repo's \
                 branches or remove it here",
                branch.value
            ),
        );
    }
}
