//! `https://` remotes through the system's git: gix in this build has no
//! HTTP transport, and git's is what every forge is tested against (smart
//! HTTP, redirects, proxies, its own TLS stack, `http.sslCAInfo`).
//!
//! The credential never appears in a command line or a file: it goes to git
//! as an `Authorization` header through `GIT_CONFIG_*` environment
//! variables, which only the coordinator's own user can read. git never
//! prompts (`GIT_TERMINAL_PROMPT=0`) and never asks a credential helper; a
//! stalled transfer is cut by git's low-speed limit and every run by a
//! deadline, its process group killed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Credentials and trust for an `https://` remote, with the password
/// resolved (never printed: Debug hides it).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HttpsAuth {
    pub username: String,
    pub password: Option<String>,
    /// The CA certificates (PEM) to trust instead of the system's, for a
    /// forge with a private CA.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for HttpsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsAuth")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// The longest a first clone may take (a big repository on a slow link).
const CLONE_LIMIT: Duration = Duration::from_secs(60 * 60);
/// The longest one incremental fetch may take.
const FETCH_LIMIT: Duration = Duration::from_secs(15 * 60);
/// Most bytes of git's error output kept for a message.
const MAX_STDERR: usize = 16 << 10;

/// Makes `dir` a bare repository whose `origin` is `url`, fetching every
/// branch as its own `refs/heads/*` (like [`super::MIRROR_REFSPEC`] for gix).
pub(super) fn clone_bare(url: &str, dir: &Path, auth: &HttpsAuth) -> Result<(), String> {
    git(
        None,
        &["init", "--bare", "--quiet"],
        Some(dir),
        auth,
        Duration::from_secs(60),
    )?;
    git(
        Some(dir),
        &["remote", "add", "origin", url],
        None,
        auth,
        Duration::from_secs(60),
    )?;
    git(
        Some(dir),
        &["config", "remote.origin.fetch", super::MIRROR_REFSPEC],
        None,
        auth,
        Duration::from_secs(60),
    )?;
    fetch_with(dir, &[], auth, CLONE_LIMIT)
}

/// Updates every branch (and, with `extra`, those refspecs too) from `origin`.
pub(super) fn fetch(dir: &Path, extra: &[&str], auth: &HttpsAuth) -> Result<(), String> {
    fetch_with(dir, extra, auth, FETCH_LIMIT)
}

fn fetch_with(dir: &Path, extra: &[&str], auth: &HttpsAuth, limit: Duration) -> Result<(), String> {
    let mut args = vec!["fetch", "--quiet", "--prune", "--no-tags", "origin"];
    if !extra.is_empty() {
        // Naming refspecs replaces the configured ones: keep the branches.
        args.push(super::MIRROR_REFSPEC);
        args.extend_from_slice(extra);
    }
    git(Some(dir), &args, None, auth, limit)
}

/// Runs git on `git_dir` (or, for `init`, creating `new_dir`); the error is
/// git's own message, with any password hidden.
fn git(
    git_dir: Option<&Path>,
    args: &[&str],
    new_dir: Option<&Path>,
    auth: &HttpsAuth,
    limit: Duration,
) -> Result<(), String> {
    let mut cmd = Command::new("git");
    if let Some(d) = git_dir {
        cmd.arg("--git-dir").arg(d);
    }
    cmd.args(args);
    if let Some(d) = new_dir {
        cmd.arg(d);
    }
    // Only what this call says: no user or system config can add a
    // credential helper, a proxy command or hooks behind the farm's back.
    // A clean environment: nothing inherited (GIT_SSL_NO_VERIFY, proxies,
    // GIT_TRACE_CURL) may change whom git trusts or print the header.
    cmd.env_clear();
    for keep in ["PATH", "TMPDIR", "LANG"] {
        if let Some(v) = std::env::var_os(keep) {
            cmd.env(keep, v);
        }
    }
    cmd.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "")
        .env("SSH_ASKPASS", "")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut config: Vec<(&str, String)> = vec![
        ("credential.helper", String::new()),
        // A transfer slower than 1 KB/s for a minute is a stalled one.
        ("http.lowSpeedLimit", "1000".into()),
        ("http.lowSpeedTime", "60".into()),
        ("protocol.allow", "never".into()),
        ("protocol.https.allow", "always".into()),
        ("protocol.http.allow", "always".into()),
    ];
    // The credential as git sends it, also hidden in git's error output.
    let basic = auth.password.as_deref().map(|p| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{p}", auth.username))
    });
    if let Some(b) = &basic {
        config.push(("http.extraHeader", format!("Authorization: Basic {b}")));
    }
    // (An inherited GIT_SSL_CAINFO cannot win over this: the environment
    // was cleared above.)
    if let Some(ca) = &auth.ca_file {
        config.push(("http.sslCAInfo", ca.display().to_string()));
    }
    cmd.env("GIT_CONFIG_COUNT", config.len().to_string());
    for (i, (k, v)) in config.iter().enumerate() {
        cmd.env(format!("GIT_CONFIG_KEY_{i}"), k)
            .env(format!("GIT_CONFIG_VALUE_{i}"), v);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            "https:// remotes need git installed on the coordinator's machine (apt install git)"
                .to_string()
        } else {
            format!("running git: {e}")
        }
    })?;
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr {
            let mut s = s.take(MAX_STDERR as u64);
            let _ = s.read_to_end(&mut buf);
            // Drain the rest so git never blocks on a full pipe.
            let _ = std::io::copy(&mut s.into_inner(), &mut std::io::sink());
        }
        buf
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() >= limit => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for git: {e}")),
        }
    };
    let Some(status) = status else {
        #[cfg(unix)]
        // SAFETY: kill(2) on the process group git leads; no memory involved.
        unsafe {
            libc::kill(-(child.id() as i32), libc::SIGKILL);
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        return Err(format!(
            "git {} took longer than {limit:?}; stopped",
            args[0]
        ));
    };
    let err = reader.join().unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&err).trim().to_string();
    if err.len() >= MAX_STDERR {
        // Cut mid-line: the last line could hold the start of a secret.
        text = text
            .rsplit_once('\n')
            .map_or(String::new(), |(head, _)| head.to_string());
    }
    if let (Some(p), Some(b)) = (auth.password.as_deref().filter(|p| !p.is_empty()), &basic) {
        text = text.replace(b.as_str(), "***").replace(p, "***");
    }
    let text = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    // git asks for a name when the server answers 401; it may not ask.
    if text.contains("terminal prompts disabled") || text.contains("Authentication failed") {
        return Err(match &auth.password {
            Some(_) => format!(
                "authentication failed: the server refused user {:?} with the configured password (HTTP 401); check the repo's username and password",
                auth.username
            ),
            None => "authentication required: the server asks for credentials (HTTP 401); set the repo's username and password".to_string(),
        });
    }
    Err(if text.is_empty() {
        format!("git {} failed ({status})", args[0])
    } else {
        format!("git {}: {text}", args[0])
    })
}
