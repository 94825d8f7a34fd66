//! The farm configuration: every kind of machine (host configs) and every kind
//! of build (build configs) in one TOML file that the farm admin edits.
//!
//! A broken config must never half-apply, and the admin should be able to fix
//! it in one pass, so [`parse`] checks the whole file and reports every problem
//! with its file, line, column and field before anything uses the result.

mod convert;
mod duration;
mod forge;
mod raw;

pub use forge::{ForgeConfig, ForgeKind, NotifyConfig, RepoAuth, SmtpConfig};

pub use duration::human_duration;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A loaded and fully validated farm config; cross references (builder to
/// host, builder to repo) are known to resolve.
#[derive(Debug, Clone, PartialEq)]
pub struct FarmConfig {
    /// Kept so the coordinator can reload the same file and quote it in errors.
    pub path: PathBuf,
    pub farm: FarmSettings,
    pub repos: BTreeMap<String, RepoConfig>,
    /// Keyed by host type, e.g. "host-linux-amd64-alice".
    pub hosts: BTreeMap<String, HostConfig>,
    pub builders: BTreeMap<String, BuildConfig>,
    /// `[serve]`: where `farmer serve` listens and keeps its data, when its
    /// flags do not say.
    pub serve: ServeSettings,
    /// `[secrets]`: where each named secret's value is read from.
    pub secrets: BTreeMap<String, crate::secrets::Source>,
    /// `[smtp]`: the mail server for notifications, if any.
    pub smtp: Option<SmtpConfig>,
}

/// `farmer serve`'s settings in the config file (a flag wins over them).
/// Read at start: changing them needs a restart, not a reload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeSettings {
    pub listen: Option<String>,
    /// Relative paths are resolved against the config file's directory.
    pub data_dir: Option<PathBuf>,
    pub ssh_listen: Option<String>,
    /// `[store] url`: where the store lives (default: SQLite in the data dir).
    pub store: Option<crate::store::Location>,
    /// `[storage]`: an S3-compatible bucket for artifacts, logs and
    /// releases (default: the data dir's `artifacts/`).
    pub storage: Option<crate::artifacts::StorageConfig>,
}

impl FarmConfig {
    /// The builders that should build `branch` of `repo`; empty when the repo
    /// is not configured or does not watch that branch, because
    /// [`BuildConfig::builds`] alone cannot know the repos' branch lists.
    pub fn builders_for<'a>(&'a self, repo: &str, branch: &str) -> Vec<&'a BuildConfig> {
        let watched = self
            .repos
            .get(repo)
            .is_some_and(|r| r.branches.iter().any(|b| b == branch));
        if !watched {
            return Vec::new();
        }
        self.builders
            .values()
            .filter(|b| b.builds(repo, branch))
            .collect()
    }
}

/// Farm-wide knobs, in `[farm]`; every one has a default so a small farm
/// needs no `[farm]` section at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FarmSettings {
    /// Buildlets older than this are refused, so a protocol change can be
    /// rolled out by publishing a new buildlet and raising the number.
    pub min_buildlet_version: u32,
    /// Attempts per build before it is reported as an infrastructure error:
    /// bounded so a dying machine cannot hide a stall behind endless retries.
    pub max_attempts: u32,
    /// How often a connected buildlet is pinged.
    pub heartbeat: Duration,
    /// Silence after which a buildlet is considered gone and its build re-run.
    pub heartbeat_timeout: Duration,
    /// A reverse link idle this long parks: its HTTP/2 session ends and
    /// only pings cross it until the machine is used (`park_after`; `false`
    /// gives `None`, sessions stay open). See [`crate::link`].
    pub park_after: Option<Duration>,
    /// Whom local buildlets run as when the coordinator runs as root, so
    /// builds cannot read root's files (the farm's secrets among them).
    pub local_user: String,
    /// Run local buildlets in a sandbox that hides the data dir. Turning it
    /// off lets every build on the local pool read the farm's secrets.
    pub local_sandbox: bool,
    /// A gomote instance nobody used for this long ends and its machine
    /// goes back to the pool (`gomote_idle_timeout`); every call renews it.
    pub gomote_idle_timeout: Duration,
    /// Most live gomote instances per user (`gomote_max_instances`), so one
    /// person cannot take every machine of a host type.
    pub gomote_max_instances: u32,
    /// The farm's public base URL (`url`), for links sent out of the farm
    /// (commit statuses, notifications); without it links use the address
    /// `farmer serve` listens on.
    pub url: Option<String>,
}

impl Default for FarmSettings {
    fn default() -> Self {
        FarmSettings {
            min_buildlet_version: 1,
            max_attempts: 3,
            heartbeat: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(30),
            park_after: Some(Duration::from_secs(15)),
            local_user: "nobody".to_string(),
            local_sandbox: true,
            gomote_idle_timeout: Duration::from_secs(30 * 60),
            gomote_max_instances: 4,
            url: None,
        }
    }
}

/// How machines of a host type come to the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PoolKind {
    /// Donated machines dial in (NAT friendly); the coordinator only waits for them.
    Reverse,
    /// The coordinator starts the buildlets itself on its own machine (demo, small farms).
    Local,
    /// Machines started on demand by an admin's `create` command and
    /// removed by its `destroy` command (containers, VMs, spare boxes).
    Exec,
}

impl PoolKind {
    /// The spelling used in the config file, for pages and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Reverse => "reverse",
            PoolKind::Local => "local",
            PoolKind::Exec => "exec",
        }
    }
}

impl fmt::Display for PoolKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kind of machine. Builders share host types, so capacity and ownership
/// are described once here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    pub name: String,
    pub pool: PoolKind,
    /// Machines that should be connected, so a missing one is visible.
    pub expected: u32,
    /// Buildlets the coordinator starts for a local host (`count`, default
    /// `expected`); always 0 for a reverse host, whose machines start themselves.
    pub local_count: u32,
    /// The program (and leading arguments) a local pool runs as its
    /// buildlet (`buildlet` in the file); empty means this executable's own
    /// buildlet. Lets a local host type run another platform's buildlet,
    /// e.g. an arm64 build under qemu.
    pub local_program: Vec<String>,
    /// Who to contact when these machines are missing or failing.
    pub owners: Vec<String>,
    pub notes: String,
    /// Base environment for every command on this host, in file order.
    pub env: Vec<(String, String)>,
    /// Facts about the machine (os, arch, ...) shown on pages and usable for matching.
    pub dimensions: BTreeMap<String, String>,
    /// Only trusted machines may run pre-submit (unreviewed) code.
    pub trusted: bool,
    /// How an exec host's machines are created and destroyed; `Some` exactly
    /// when `pool = "exec"`.
    pub exec: Option<ExecConfig>,
    /// Who may lease these machines interactively (`gomote` in the file).
    pub gomote: GomoteAccess,
}

/// Who may lease a host type's machines with gomote: the machine owner's
/// choice, shown on the host page. Machines the farm does not own
/// (`pool = "reverse"`) default to nobody; the farm's own (local and exec
/// pools) to every user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GomoteAccess {
    /// `gomote = false`.
    Nobody,
    /// `gomote = true`.
    Everyone,
    /// `gomote = ["alice", "bob"]`.
    Users(Vec<String>),
}

impl GomoteAccess {
    /// Whether `user` may lease; admins may lease what anyone may, and
    /// nobody may lease a host whose owner said `false`.
    pub fn allows(&self, user: &str, admin: bool) -> bool {
        match self {
            GomoteAccess::Nobody => false,
            GomoteAccess::Everyone => true,
            GomoteAccess::Users(u) => admin || u.iter().any(|x| x == user),
        }
    }

    /// The rule in words, for refusals and the host page.
    pub fn describe(&self) -> String {
        match self {
            GomoteAccess::Nobody => "gomote = false: nobody may lease these machines".into(),
            GomoteAccess::Everyone => "gomote = true: every user may lease these machines".into(),
            GomoteAccess::Users(u) => format!(
                "gomote = [{}]: only these users (and admins) may lease these machines",
                u.iter()
                    .map(|x| format!("{x:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// The settings of an elastic host (`pool = "exec"`): the coordinator runs
/// `create` when requests wait and `destroy` when a machine is no longer
/// wanted. Both run with a clean environment plus `FARMER_HOSTNAME`,
/// `FARMER_HOST_TYPE`, `FARMER_COORDINATOR`, `FARMER_TLS_PIN` and
/// `FARMER_KEY_FILE`; the created machine must dial in as a reverse
/// buildlet under that host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecConfig {
    /// Program and arguments (`create = "shell"` becomes `sh -c`).
    pub create: Vec<String>,
    pub destroy: Vec<String>,
    /// Most machines at once, counting those being created or destroyed.
    pub max: u32,
    /// Idle machines kept warm when nothing waits.
    pub min_idle: u32,
    /// An idle machine beyond `min_idle` is destroyed after this long.
    pub idle_timeout: Duration,
    /// A created machine that has not dialled in by then is destroyed.
    pub register_timeout: Duration,
    /// A `create` still running after this long is killed (and destroyed).
    pub create_timeout: Duration,
    /// A `destroy` still running after this long is killed and retried.
    pub destroy_timeout: Duration,
    /// Destroy each machine after one lease instead of cleaning it.
    pub ephemeral: bool,
}

/// A kind of build: what to run, where, and on which repos and branches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildConfig {
    pub name: String,
    /// The host type its buildlets come from (`host` in the file).
    pub host_type: String,
    /// Added after the host's environment, in file order.
    pub env: Vec<(String, String)>,
    /// Repos it builds; empty means every repo.
    pub repos: Vec<String>,
    /// Branches it builds; empty means every configured branch of its repos.
    pub branches: Vec<String>,
    /// Never empty.
    pub steps: Vec<Step>,
    /// Overall limit, so a hung build fails instead of holding a machine forever.
    pub timeout: Duration,
    /// Whether pre-submit (try) work may run; it still only goes to trusted
    /// hosts, which is checked when the work is requested, not here.
    pub presubmit: bool,
    pub notes: String,
    /// Re-runs of a step's failed tests (failed units of a sharded step)
    /// before the build fails; a test that then passes is flaky.
    pub retry_failed: u32,
}

impl BuildConfig {
    /// Whether this builder wants `branch` of `repo`, assuming the farm polls
    /// that pair (see [`FarmConfig::builders_for`] for the full check).
    pub fn builds(&self, repo: &str, branch: &str) -> bool {
        (self.repos.is_empty() || self.repos.iter().any(|r| r == repo))
            && (self.branches.is_empty() || self.branches.iter().any(|b| b == branch))
    }
}

/// One command of a build; each step has its own log section and timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    /// Program and arguments; `run = "..."` in the file becomes `["sh", "-c", run]`.
    pub command: Vec<String>,
    /// Relative to the source root in the work dir, never escaping it.
    pub dir: Option<String>,
    /// Added after the host's and the builder's environment.
    pub env: Vec<(String, String)>,
    /// For a sharded step, the whole step (listing and every unit on every
    /// machine); otherwise the command's own limit.
    pub timeout: Duration,
    /// Set for a step split into units run across the build's machine and
    /// helper machines; `command` is then empty.
    pub shard: Option<Shard>,
    /// Result files read after the step (besides what its output shows).
    pub results: Vec<crate::results::ResultFiles>,
    /// Globs of files kept after the step passes (`artifacts = [...]`),
    /// relative to its directory: stored, listed on the build page and
    /// downloadable.
    pub artifacts: Vec<String>,
}

/// Most re-runs of failed tests a builder may ask for.
pub const MAX_RETRY_FAILED: u32 = 5;

/// Most helper machines one sharded step may ask for: each is a lease of
/// the build's host type, so a typo must not empty a pool.
pub const MAX_SHARD_HELPERS: u32 = 64;

/// How a step is split into units (`shard.list`, `shard.run`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Prints the units, one per line; runs on the build's own machine.
    pub list: Vec<String>,
    /// Runs one unit; `{unit}` in any argument is replaced by its name (and
    /// the unit is also in `$FARMER_UNIT`). `run = "..."` in the file is
    /// `sh -c` with that script, where the name is quoted for the shell.
    pub run: Vec<String>,
    /// Machines beyond the build's own, for post-submit and other builds.
    pub helpers: u32,
    /// Machines beyond the build's own for pre-submit builds.
    pub try_helpers: u32,
}

impl Shard {
    /// The helpers a build of `kind` asks for.
    pub fn helpers_for(&self, presubmit: bool) -> u32 {
        if presubmit {
            self.try_helpers
        } else {
            self.helpers
        }
    }

    /// The command that runs `unit`: in a shell's script (`sh -c SCRIPT`)
    /// the name is quoted for the shell, anywhere else it goes as it is.
    pub fn command_for(&self, unit: &str) -> Vec<String> {
        let script = is_shell_script(&self.run);
        self.run
            .iter()
            .enumerate()
            .map(|(i, a)| {
                if script && i == 2 {
                    a.replace("{unit}", &shell_quote(unit))
                } else {
                    a.replace("{unit}", unit)
                }
            })
            .collect()
    }
}

/// Whether `cmd` is a shell running a script (`sh -c SCRIPT ...`).
pub(crate) fn is_shell_script(cmd: &[String]) -> bool {
    let shell = cmd.first().map(|p| p.rsplit('/').next().unwrap_or(p));
    matches!(
        shell,
        Some("sh" | "bash" | "dash" | "zsh" | "ksh" | "ash" | "mksh")
    ) && cmd.get(1).is_some_and(|a| a == "-c")
        && cmd.len() >= 3
}

/// Whether `{unit}` appears inside single or double quotes of a shell
/// script, where a quoted name would be quoted twice (and a name with a
/// quote could end the quotes early).
pub(crate) fn unit_in_quotes(script: &str) -> bool {
    #[derive(PartialEq)]
    enum Q {
        None,
        Single,
        Double,
    }
    let mut q = Q::None;
    let mut escaped = false;
    for (i, c) in script.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        if q != Q::None && script[i..].starts_with("{unit}") {
            return true;
        }
        match (&q, c) {
            (Q::Single, '\'') => q = Q::None,
            (Q::Single, _) => {}
            (_, '\\') => escaped = true,
            (Q::None, '\'') => q = Q::Single,
            (Q::None, '"') => q = Q::Double,
            (Q::Double, '"') => q = Q::None,
            _ => {}
        }
    }
    false
}

/// `s` as one shell word: unchanged when it holds nothing the shell would
/// interpret, else single-quoted. Concatenates with its neighbours, so
/// `^{unit}$` stays one word.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=+,@%^".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A source repository the farm watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoConfig {
    pub name: String,
    /// A URL, or an absolute local path (a relative path in the file is
    /// resolved against the config file's directory, so the farm does not
    /// depend on the coordinator's working directory).
    pub url: String,
    pub branches: Vec<String>,
    pub poll_interval: Duration,
    /// Commits of a branch's existing history built when the farm first
    /// sees the branch (0: none; only commits that come later are built).
    pub backfill: u32,
    /// Credentials and trust for an `https://` url.
    pub auth: RepoAuth,
    /// `[repos.X.forge]`: webhooks and commit statuses.
    pub forge: Option<ForgeConfig>,
    /// `[repos.X.notify]`: who hears when a branch breaks and is fixed.
    pub notify: NotifyConfig,
}

/// One problem in a farm config, located so an editor can jump to it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{}:{line}:{column}: {}{message}", .file.display(), field_prefix(.field))]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no place in the text (e.g. unreadable file).
    pub line: usize,
    /// 1-based, in characters; 0 when unknown.
    pub column: usize,
    /// Dotted path of the offending field, e.g. "builders.linux-amd64.host";
    /// empty for syntax and read errors.
    pub field: String,
    pub message: String,
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

/// Every problem found in a farm config, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Parses and validates a farm config; `file` is only used to resolve relative
/// repo paths and to label errors.
pub fn parse(file: &Path, text: &str) -> Result<FarmConfig, ConfigErrors> {
    let mut ctx = raw::Ctx::new(file, text);
    let tree: raw::Raw = match toml::from_str(text) {
        Ok(tree) => tree,
        Err(e) => {
            let message = syntax_message(&e);
            ctx.error(e.span().map(|s| s.start), "", message);
            return Err(ConfigErrors(ctx.errors));
        }
    };
    let config = convert::farm_config(&mut ctx, &tree);
    if ctx.errors.is_empty() {
        Ok(config)
    } else {
        let mut errors = ctx.errors;
        errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(errors))
    }
}

fn syntax_message(e: &toml::de::Error) -> String {
    let message = e.message().trim();
    if message.contains("$__toml_private_datetime") {
        // The located tree has no place for TOML dates; say so plainly.
        return "dates and times are not used in a farm config; durations are strings like \"10m\""
            .into();
    }
    let message = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>();
    format!("invalid TOML: {}", message.join("; "))
}

/// Reads and parses a farm config file.
pub fn load(file: &Path) -> Result<FarmConfig, ConfigErrors> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            field: String::new(),
            message: format!("cannot read the farm config {}: {e}", file.display()),
        }])
    })?;
    let config = parse(file, &text)?;
    tracing::debug!(
        file = %file.display(),
        repos = config.repos.len(),
        hosts = config.hosts.len(),
        builders = config.builders.len(),
        "loaded farm config"
    );
    Ok(config)
}
