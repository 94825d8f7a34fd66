//! Buildlet releases: publishing signed buildlet binaries, serving them to
//! stage0, and moving the fleet onto them.
//!
//! * **Publishing** (`farmer buildlet publish --os linux --arch amd64 FILE`,
//!   [`publish`]): the binary goes into the artifact store under its
//!   SHA-256, and the release index (`stage0/index.json`) gets a manifest
//!   for the platform — version label, digest, size, protocol version, time —
//!   signed with the farm's Ed25519 release key (created on first use in
//!   `<data-dir>/release/`, private part mode 0600). The coordinator process
//!   never needs the private key: it serves what the publisher signed.
//! * **Noticing a publish**: the CLI writes the store directly; the running
//!   coordinator polls the index's change token every second
//!   ([`upgrade_loop`]) and on every manifest request, so a publish is live
//!   within about a second, with no API call and no restart. (An object
//!   store works the same way: the token is its ETag.)
//! * **Serving** ([`serve::router`]): `/stage0/manifest?os=&arch=` (the signed
//!   manifest, JSON), `/stage0/buildlet?os=&arch=[&sha256=]` (the binary,
//!   streamed), `/stage0/release-key` (the public key), `/api/releases`.
//! * **Upgrades**: every machine reports the SHA-256 of its executable and,
//!   if stage0 started it, the platform stage0 fetched ([`Registration`]).
//!   A machine under stage0 that runs something else than the current
//!   release of its platform is drained — no new builds — and asked to
//!   `/halt` once it is idle (a busy one after its build), so its stage0
//!   comes back with the new binary. Each machine is asked once per release:
//!   one that comes back on the old binary (its stage0 could not download or
//!   verify the new one) is flagged `stuck` instead of being halted in a
//!   loop, and one not started by stage0 is flagged `not-managed` (halting
//!   it would not upgrade it).
//! * **Minimum version**: the config's `min_buildlet_version` is a protocol
//!   version. Publishing a binary whose embedded protocol version
//!   ([`buildlet::proto::BINARY_INFO`]) is below it is refused, and a current
//!   release below it is reported on `/api/status`.
//!
//! This module is the releases' state and logic, which need no farm: the
//! farm holds a [`Releases`], and the upgrade loop works on the pool alone.
//! The HTTP endpoints, which take the farm (for its config), are in
//! [`serve`], a layer above the farm.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::http::HeaderMap;
use bytes::Bytes;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Digest;
use stage0::{Manifest, Platform, ReleaseKey};

use crate::artifacts::{ArtifactStore, LocalDir};
pub use crate::pool::MachineBinary;
use crate::pool::{Drained, Pool};
use crate::store::now_ms;

pub mod serve;

/// The release index inside the artifact store.
pub const INDEX_KEY: &str = "stage0/index.json";
/// Directory of the release key pair inside the data dir.
pub const KEY_DIR: &str = "release";
/// The private key (hex seed), mode 0600.
pub const PRIVATE_KEY_FILE: &str = "release.key";
/// The public key (hex), what stage0 is installed with.
pub const PUBLIC_KEY_FILE: &str = "release.pub";
/// The artifact store directory inside the data dir.
pub const ARTIFACTS_DIR: &str = "artifacts";
/// Past releases kept in the index per platform (to name what machines run).
const HISTORY_PER_PLATFORM: usize = 20;

fn blob_key(sha256: &str) -> String {
    format!("stage0/blobs/{sha256}")
}

/// The SHA-256 (hex) of a stored blob, read as a stream; `None` if missing.
async fn blob_digest(store: &dyn ArtifactStore, key: &str) -> std::io::Result<Option<String>> {
    use futures_util::StreamExt;
    let Some(mut obj) = store.open(key).await? else {
        return Ok(None);
    };
    let mut h = sha2::Sha256::new();
    while let Some(chunk) = obj.body.next().await {
        h.update(&chunk?);
    }
    Ok(Some(hex::encode(h.finalize())))
}

/// The release index: the current manifest per platform and recent ones.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Index {
    /// `os/arch` → current manifest.
    #[serde(default)]
    pub current: BTreeMap<String, Manifest>,
    /// Every published manifest, oldest first (bounded per platform).
    #[serde(default)]
    pub history: Vec<Manifest>,
}

async fn load_index(store: &dyn ArtifactStore) -> anyhow::Result<Index> {
    match store.get(INDEX_KEY).await? {
        None => Ok(Index::default()),
        Some(b) => serde_json::from_slice(&b)
            .with_context(|| format!("the release index {INDEX_KEY} in {}", store.describe())),
    }
}

/// The release key pair's directory in `data_dir`.
pub fn key_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(KEY_DIR)
}

/// Loads the release signing key from `path`, or creates it (mode 0600)
/// and writes the public key next to it as [`PUBLIC_KEY_FILE`].
pub fn load_or_create_key(path: &Path) -> anyhow::Result<SigningKey> {
    let key = match std::fs::read_to_string(path) {
        Ok(text) => {
            let seed: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .with_context(|| {
                    format!("{} is not a release key (64 hex digits)", path.display())
                })?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                if let Ok(m) = std::fs::metadata(path)
                    && m.permissions().mode() & 0o077 != 0
                {
                    tracing::warn!(
                        "the release private key {} is readable by other users; chmod 600 it",
                        path.display()
                    );
                }
            }
            SigningKey::from_bytes(&seed)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            crate::keys::write_private(path, format!("{}\n", hex::encode(seed)).as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            tracing::info!("created the farm's release key {}", path.display());
            SigningKey::from_bytes(&seed)
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(key)
}

fn write_public_key(data_dir: &Path, key: &SigningKey) -> anyhow::Result<()> {
    let path = key_dir(data_dir).join(PUBLIC_KEY_FILE);
    let text = format!("{}\n", ReleaseKey::from_signing(key));
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        std::fs::create_dir_all(key_dir(data_dir))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The protocol version and build embedded in a buildlet executable
/// ([`buildlet::proto::BINARY_INFO`]), found without running it.
pub fn binary_info(data: &[u8]) -> Option<(u32, String)> {
    // Built at run time so this code does not carry the marker itself.
    let needle = ["FARMER_BUILDLET", "_INFO protocol="].concat();
    let needle = needle.as_bytes();
    let mut from = 0;
    while from + needle.len() <= data.len() {
        let rel = data[from..].iter().position(|&b| b == needle[0])?;
        let at = from + rel;
        from = at + 1;
        if !data[at..].starts_with(needle) {
            continue;
        }
        let rest = &data[at + needle.len()..];
        let line = &rest[..rest.len().min(200)];
        let Some(end) = line.iter().position(|&b| b == b'\n') else {
            continue;
        };
        let Ok(line) = std::str::from_utf8(&line[..end]) else {
            continue;
        };
        let mut words = line.split(' ');
        let Some(Ok(protocol)) = words.next().map(str::parse::<u32>) else {
            continue;
        };
        let build = words
            .find_map(|w| w.strip_prefix("build="))
            .unwrap_or("")
            .to_string();
        return Some((protocol, build));
    }
    None
}

fn protocol_of(given: Option<u32>, info: &Option<(u32, String)>) -> anyhow::Result<u32> {
    match (given, info) {
        (Some(p), _) => Ok(p),
        (None, Some((p, _))) => Ok(*p),
        (None, None) => bail!(
            "this file does not look like a farmer buildlet: it carries no buildlet protocol marker. Publish a `buildlet` binary (or `farmer`, which can run as one), or pass --protocol N if you are sure"
        ),
    }
}

/// What to publish.
pub struct PublishRequest {
    pub platform: Platform,
    pub data: Bytes,
    /// Version label; default `<build>-<first 12 hex of the SHA-256>`.
    pub version: Option<String>,
    /// Protocol version; default: read from the binary.
    pub protocol: Option<u32>,
    /// Refuse binaries below this protocol version (`min_buildlet_version`).
    pub min_protocol: Option<u32>,
}

/// What [`publish`] did.
pub struct Published {
    pub manifest: Manifest,
    /// False when this exact binary and label already were the current release.
    pub changed: bool,
}

/// Stores the binary, signs its manifest and makes it the current release
/// of its platform.
pub async fn publish(
    store: &dyn ArtifactStore,
    key: &SigningKey,
    req: PublishRequest,
) -> anyhow::Result<Published> {
    if req.data.is_empty() {
        bail!("the file is empty");
    }
    let sha256 = hex::encode(sha2::Sha256::digest(&req.data));
    let info = binary_info(&req.data);
    let protocol = protocol_of(req.protocol, &info)?;
    if let Some(min) = req.min_protocol
        && protocol < min
    {
        bail!(
            "this buildlet speaks protocol version {protocol}, below the farm's min_buildlet_version = {min}: every machine that upgrades to it would be refused. Publish a newer buildlet, or lower min_buildlet_version in the config first"
        );
    }
    let version = match req.version {
        Some(v) => v,
        None => {
            let build = info
                .as_ref()
                .map(|(_, b)| b.as_str())
                .filter(|b| !b.is_empty())
                .unwrap_or("buildlet");
            format!("{build}-{}", &sha256[..12])
        }
    };
    stage0::manifest::check_version_label(&version).map_err(anyhow::Error::msg)?;
    // A stored blob that no longer matches its digest (a bad disk, a
    // truncated copy) is replaced: publishing the same binary repairs it.
    let blob = blob_key(&sha256);
    let intact = match store.version(&blob).await? {
        None => false,
        Some(_) => blob_digest(store, &blob).await?.as_deref() == Some(sha256.as_str()),
    };
    if !intact {
        store
            .put(&blob, req.data.clone())
            .await
            .with_context(|| format!("storing the binary in {}", store.describe()))?;
    }
    let mut index = load_index(store).await?;
    let platform = req.platform.to_string();
    let prev = index.current.get(&platform).cloned();
    if let Some(p) = &prev
        && p.sha256 == sha256
        && p.version == version
        && p.protocol == protocol
        && p.key == ReleaseKey::from_signing(key).to_string()
    {
        return Ok(Published {
            manifest: p.clone(),
            changed: false,
        });
    }
    let published_at = now_ms().max(prev.as_ref().map_or(0, |p| p.published_at + 1));
    let mut m = Manifest {
        os: req.platform.os.clone(),
        arch: req.platform.arch.clone(),
        version,
        sha256: sha256.clone(),
        size: req.data.len() as u64,
        protocol,
        published_at,
        signature: String::new(),
        key: String::new(),
    };
    m.sign(key);
    index.current.insert(platform.clone(), m.clone());
    index.history.push(m.clone());
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut keep: Vec<Manifest> = Vec::new();
    for h in index.history.into_iter().rev() {
        let n = seen.entry(format!("{}/{}", h.os, h.arch)).or_default();
        *n += 1;
        if *n <= HISTORY_PER_PLATFORM {
            keep.push(h);
        }
    }
    keep.reverse();
    index.history = keep;
    let json = serde_json::to_vec_pretty(&index)?;
    store
        .put(INDEX_KEY, Bytes::from(json))
        .await
        .with_context(|| format!("writing the release index in {}", store.describe()))?;
    Ok(Published {
        manifest: m,
        changed: true,
    })
}

/// The artifact store a coordinator with this data dir uses.
pub fn local_store(data_dir: &Path) -> Arc<dyn ArtifactStore> {
    Arc::new(LocalDir::new(data_dir.join(ARTIFACTS_DIR)))
}

/// `farmer buildlet publish`: its flags.
#[derive(clap::Parser, Debug)]
#[command(
    name = "farmer buildlet publish",
    about = "Publish a buildlet binary for a platform: stage0 on every machine of that OS/arch picks it up",
    after_help = "Example:\n  farmer buildlet publish --os linux --arch amd64 target/x86_64-unknown-linux-musl/release/buildlet --version 2026.03.1"
)]
pub struct PublishCli {
    /// Operating system (Rust or Go name: linux, macos/darwin, windows, freebsd, ...).
    #[arg(long)]
    os: String,
    /// CPU architecture (Rust or Go name: x86_64/amd64, aarch64/arm64, riscv64, ...).
    #[arg(long)]
    arch: String,
    /// The buildlet executable.
    file: PathBuf,
    /// The coordinator's data dir (holds the artifact store and the release key).
    #[arg(long = "data-dir", default_value = "farmer-data")]
    data_dir: PathBuf,
    /// Version label shown to admins and owners. Default: `<build>-<sha256 prefix>`.
    #[arg(long)]
    version: Option<String>,
    /// The buildlet protocol version of the file, when it cannot be read from it.
    #[arg(long)]
    protocol: Option<u32>,
    /// The farm config: its `min_buildlet_version` is checked, and its `[storage]` (an S3 bucket) receives the release. Default: farmer.toml in the data dir, if any.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The release private key. Default: `<data-dir>/release/release.key` (created if missing).
    #[arg(long = "key-file")]
    key_file: Option<PathBuf>,
}

/// What `farmer buildlet publish` reads from the farm config: the oldest
/// protocol accepted, and where artifacts live (`[storage]`).
fn farm_settings(
    config: Option<&Path>,
    data_dir: &Path,
) -> anyhow::Result<(Option<u32>, Option<crate::artifacts::StorageConfig>)> {
    let (path, explicit) = match config {
        Some(p) => (p.to_path_buf(), true),
        None => (data_dir.join(crate::demo::CONFIG_FILE), false),
    };
    if !explicit && !path.exists() {
        return Ok((None, None));
    }
    match crate::config::load(&path) {
        Ok(c) => Ok((Some(c.farm.min_buildlet_version), c.serve.storage)),
        Err(e) if explicit => bail!("{e}"),
        Err(_) => {
            tracing::warn!(
                "{} has errors; not checking min_buildlet_version, publishing to the data dir",
                path.display()
            );
            Ok((None, None))
        }
    }
}

/// Publishes into `store` (the data dir's local store by default) with the
/// release key in `key_file` (created if missing, its public half written
/// into the data dir): what `farmer buildlet publish` and `farmer up` share.
fn publish_local(
    data_dir: &Path,
    key_file: &Path,
    store: Option<Arc<dyn ArtifactStore>>,
    req: PublishRequest,
) -> anyhow::Result<(Published, Arc<dyn ArtifactStore>)> {
    let key = load_or_create_key(key_file)?;
    write_public_key(data_dir, &key)?;
    let store = store.unwrap_or_else(|| local_store(data_dir));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let p = rt.block_on(publish(store.as_ref(), &key, req))?;
    Ok((p, store))
}

/// Runs `farmer buildlet publish` (args start with the program name).
pub fn publish_main(args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    let cli: PublishCli = goflags::parse_from(args);
    let platform = Platform::parse(&cli.os, &cli.arch).map_err(anyhow::Error::msg)?;
    let data =
        std::fs::read(&cli.file).with_context(|| format!("reading {}", cli.file.display()))?;
    let (min, storage) = farm_settings(cli.config.as_deref(), &cli.data_dir)?;
    let store = match &storage {
        Some(s) => Some(crate::artifacts::open(
            Some(s),
            &cli.data_dir.join(ARTIFACTS_DIR),
        )?),
        None => None,
    };
    let key_file = cli
        .key_file
        .clone()
        .unwrap_or_else(|| key_dir(&cli.data_dir).join(PRIVATE_KEY_FILE));
    // Check the file before a key is created for it.
    protocol_of(cli.protocol, &binary_info(&data))?;
    let (p, store) = publish_local(
        &cli.data_dir,
        &key_file,
        store,
        PublishRequest {
            platform: platform.clone(),
            data: Bytes::from(data),
            version: cli.version,
            protocol: cli.protocol,
            min_protocol: min,
        },
    )?;
    let m = &p.manifest;
    if p.changed {
        println!("published buildlet {} for {platform}", m.version);
    } else {
        println!(
            "buildlet {} for {platform} is already the current release; nothing changed",
            m.version
        );
    }
    println!("  sha256       {}", m.sha256);
    println!("  size         {} bytes", m.size);
    println!("  protocol     {}", m.protocol);
    println!("  store        {}", store.describe());
    println!(
        "  release key  {}   (install stage0 with -release-key={})",
        m.key, m.key
    );
    if p.changed {
        println!(
            "A running coordinator serves it within a few seconds; idle machines under stage0 on older versions are asked to restart on it, busy ones after their build."
        );
    }
    Ok(())
}

/// Publishes the running executable (which can run as a buildlet) for this
/// platform, for `farmer up`. Does nothing when it already is the current
/// release.
pub fn publish_for_demo(data_dir: &Path) -> anyhow::Result<Manifest> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let data = std::fs::read(&exe).with_context(|| format!("reading {}", exe.display()))?;
    let (p, _) = publish_local(
        data_dir,
        &key_dir(data_dir).join(PRIVATE_KEY_FILE),
        None,
        PublishRequest {
            platform: Platform::current(),
            data: Bytes::from(data),
            version: None,
            protocol: None,
            min_protocol: None,
        },
    )?;
    if p.changed {
        tracing::info!(
            version = %p.manifest.version,
            platform = %p.manifest.platform(),
            "published this executable as the demo's buildlet release"
        );
    }
    Ok(p.manifest)
}

/// What a buildlet said about its binary when registering.
#[derive(Debug, Clone, Default)]
pub struct Registration {
    pub sha256: String,
    /// The platform stage0 fetched, if stage0 started it.
    pub stage0: Option<Platform>,
}

impl Registration {
    pub fn from_headers(h: &HeaderMap) -> Registration {
        let get = |n: &str| {
            h.get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .unwrap_or("")
        };
        let sha = get(buildlet::proto::HDR_BINARY_SHA256);
        let sha256 = if sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            sha.to_ascii_lowercase()
        } else {
            String::new()
        };
        let stage0 = Platform::parse_pair(get(buildlet::proto::HDR_STAGE0)).ok();
        Registration { sha256, stage0 }
    }
}

#[derive(Debug, Clone)]
struct Asked {
    /// The release it was asked to move to.
    sha256: String,
    version: String,
    /// The pool id of the connection that was asked.
    machine_id: u64,
    at: i64,
}

#[derive(Default)]
struct Loaded {
    token: Option<String>,
    index: Index,
}

/// The coordinator's view of the published releases, and the upgrades it
/// asked for.
pub struct Releases {
    store: Arc<dyn ArtifactStore>,
    data_dir: PathBuf,
    loaded: RwLock<Loaded>,
    asked: Mutex<HashMap<String, Asked>>,
    refresh_lock: tokio::sync::Mutex<()>,
    /// Blobs whose digest was checked: key → stored version.
    verified: Mutex<HashMap<String, String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Releases {
    /// Releases in the data dir's local artifact store.
    pub fn local(data_dir: &Path) -> Releases {
        Releases::with_store(data_dir, local_store(data_dir))
    }

    pub fn with_store(data_dir: &Path, store: Arc<dyn ArtifactStore>) -> Releases {
        Releases {
            store,
            data_dir: data_dir.to_path_buf(),
            loaded: RwLock::new(Loaded::default()),
            asked: Mutex::new(HashMap::new()),
            refresh_lock: tokio::sync::Mutex::new(()),
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// Checks that the stored binary of `m` still has its digest; the error
    /// is a sentence for the `500` answer.
    async fn check_blob(&self, m: &Manifest, p: &Platform) -> Result<(), String> {
        let key = blob_key(&m.sha256);
        let store = self.store();
        let version = store
            .version(&key)
            .await
            .map_err(|e| format!("reading buildlet {} for {p}: {e}", m.version))?;
        let Some(version) = version else {
            return Ok(()); // the caller reports it missing
        };
        if lock(&self.verified).get(&key) == Some(&version) {
            return Ok(());
        }
        let digest = blob_digest(store, &key)
            .await
            .map_err(|e| format!("reading buildlet {} for {p}: {e}", m.version))?;
        if digest.as_deref() != Some(m.sha256.as_str()) {
            tracing::error!(version = %m.version, %p, "the stored buildlet binary is corrupt");
            return Err(format!(
                "the stored binary of buildlet {} for {p} is corrupt (its SHA-256 is not {}); the farm admin must publish it again with `farmer buildlet publish`",
                m.version, m.sha256
            ));
        }
        lock(&self.verified).insert(key, version);
        Ok(())
    }

    pub fn store(&self) -> &dyn ArtifactStore {
        self.store.as_ref()
    }

    /// Re-reads the index if it changed. Returns whether it did.
    pub async fn refresh(&self) -> bool {
        let _g = self.refresh_lock.lock().await;
        let token = match self.store.version(INDEX_KEY).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("checking the release index: {e}");
                return false;
            }
        };
        if self.loaded.read().unwrap_or_else(|e| e.into_inner()).token == token {
            return false;
        }
        let index = match load_index(self.store.as_ref()).await {
            Ok(i) => i,
            Err(e) => {
                tracing::error!("{e:#}; keeping the releases loaded before");
                return false;
            }
        };
        let mut l = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        for (p, m) in &index.current {
            if l.index.current.get(p).map(|o| &o.sha256) != Some(&m.sha256) {
                tracing::info!(platform = %p, version = %m.version, sha256 = %m.sha256, "buildlet release is now current");
            }
        }
        l.token = token;
        l.index = index;
        true
    }

    /// The current release of a platform.
    pub fn current(&self, p: &Platform) -> Option<Manifest> {
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .index
            .current
            .get(&p.to_string())
            .cloned()
    }

    /// Every current release.
    pub fn all_current(&self) -> Vec<Manifest> {
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .index
            .current
            .values()
            .cloned()
            .collect()
    }

    /// A published release of `p` with this digest.
    pub fn find(&self, p: &Platform, sha256: &str) -> Option<Manifest> {
        let l = self.loaded.read().unwrap_or_else(|e| e.into_inner());
        l.index
            .history
            .iter()
            .rev()
            .chain(l.index.current.values())
            .find(|m| m.sha256 == sha256 && m.os == p.os && m.arch == p.arch)
            .cloned()
    }

    /// The release public key: the data dir's public key file, else the key
    /// that signed the current releases.
    pub fn public_key(&self) -> Option<String> {
        if let Ok(t) = std::fs::read_to_string(key_dir(&self.data_dir).join(PUBLIC_KEY_FILE))
            && let Ok(k) = ReleaseKey::parse(&t)
        {
            return Some(k.to_string());
        }
        self.all_current()
            .into_iter()
            .map(|m| m.key)
            .find(|k| ReleaseKey::parse(k).is_ok())
    }

    /// Where a machine's binary stands, without acting on it.
    fn classify(&self, b: &mut MachineBinary, id: u64, hostname: &str) {
        let platform = Platform::parse_pair(&b.platform).ok();
        b.release = platform
            .as_ref()
            .and_then(|p| self.find(p, &b.sha256))
            .map(|m| m.version);
        b.note.clear();
        let Some(cur) = platform.as_ref().and_then(|p| self.current(p)) else {
            b.status = "no-release".into();
            return;
        };
        let runs = b
            .release
            .clone()
            .unwrap_or_else(|| match b.sha256.get(..12) {
                Some(s) => format!("an unpublished binary ({s}…)"),
                None => "a binary that did not report its digest".into(),
            });
        if b.sha256 == cur.sha256 {
            b.status = "current".into();
            return;
        }
        if !b.stage0 {
            b.status = "not-managed".into();
            b.note = format!(
                "runs {runs}, not the current {}; it was not started by stage0, so halting it would not upgrade it: update it by hand or run it under stage0",
                cur.version
            );
            return;
        }
        match lock(&self.asked).get(hostname) {
            Some(a) if a.sha256 == cur.sha256 && a.machine_id == id => {
                b.status = "upgrading".into();
                b.note = format!("asked to restart on {}", cur.version);
            }
            Some(a) if a.sha256 == cur.sha256 => {
                b.status = "stuck".into();
                b.note = format!(
                    "was asked to restart on {} at {} but came back on {runs}: its stage0 could not download or verify the new binary (see the stage0 log on the machine)",
                    a.version,
                    crate::config::human_duration(((now_ms() - a.at) / 1000).max(0)) + " ago"
                );
            }
            _ => {
                b.status = "outdated".into();
                b.note = format!("runs {runs}; will restart on {} when idle", cur.version);
            }
        }
    }

    /// Records what a machine said about its binary when it registered.
    pub fn machine_joined(
        &self,
        pool: &Pool,
        id: u64,
        hostname: &str,
        status: &buildlet::proto::Status,
        reg: &Registration,
    ) {
        let mut b = reported_binary(status, reg);
        self.classify(&mut b, id, hostname);
        if b.status == "stuck" {
            tracing::warn!(%hostname, "{}", b.note);
        }
        pool.set_binary(id, b);
    }

    /// Classifies every connected machine and asks the outdated idle ones
    /// under stage0 to halt (busy ones are drained and asked after their
    /// build).
    pub fn tick(&self, pool: &Arc<Pool>) {
        for m in pool.snapshot() {
            if m.binary.status.is_empty() {
                // Registering: `machine_joined` has not recorded its binary yet.
                continue;
            }
            let mut b = m.binary.clone();
            self.classify(&mut b, m.id, &m.hostname);
            if b.status == "outdated" {
                let Some(cur) = Platform::parse_pair(&b.platform)
                    .ok()
                    .and_then(|p| self.current(&p))
                else {
                    continue;
                };
                match pool.drain(m.id) {
                    Some(Drained::Idle(client)) => {
                        lock(&self.asked).insert(
                            m.hostname.clone(),
                            Asked {
                                sha256: cur.sha256.clone(),
                                version: cur.version.clone(),
                                machine_id: m.id,
                                at: now_ms(),
                            },
                        );
                        b.status = "upgrading".into();
                        b.note = format!("asked to restart on {}", cur.version);
                        tracing::info!(hostname = %m.hostname, from = %b.release.as_deref().unwrap_or(&b.sha256), to = %cur.version, "asking an outdated machine to halt so its stage0 upgrades it");
                        let pool = pool.clone();
                        let (id, version) = (m.id, cur.version.clone());
                        tokio::spawn(async move {
                            let r =
                                tokio::time::timeout(Duration::from_secs(10), client.halt()).await;
                            if let Ok(Err(e)) = &r {
                                tracing::debug!("halt for upgrade: {e}");
                            }
                            pool.remove(id, &format!("halted to restart on buildlet {version}"));
                        });
                    }
                    Some(Drained::Busy) => {
                        b.note = format!(
                            "runs {}; takes no new builds and restarts on {} after this one",
                            b.release.as_deref().unwrap_or("an older binary"),
                            cur.version
                        );
                    }
                    None => continue,
                }
            }
            if b != m.binary {
                pool.set_binary(m.id, b);
            }
        }
    }

    /// Sentences about releases that contradict the config's
    /// `min_buildlet_version`.
    pub fn warnings(&self, min: u32) -> Vec<String> {
        self.all_current()
            .into_iter()
            .filter(|m| m.protocol < min)
            .map(|m| {
                format!(
                    "the current buildlet for {}/{} ({}) speaks protocol {} but min_buildlet_version = {min}: machines that upgrade to it are refused; publish a newer buildlet",
                    m.os, m.arch, m.version, m.protocol
                )
            })
            .collect()
    }
}

/// Runs forever: notices publishes (polling the index's change token every
/// second) and moves the pool's outdated machines onto the current release.
pub async fn upgrade_loop(releases: Arc<Releases>, pool: Arc<Pool>) {
    loop {
        releases.refresh().await;
        releases.tick(&pool);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn release_json(m: &Manifest) -> serde_json::Value {
    json!({
        "platform": format!("{}/{}", m.os, m.arch),
        "version": m.version,
        "sha256": m.sha256,
        "size": m.size,
        "protocol": m.protocol,
        "published_at": m.published_at,
    })
}

/// What a registering machine said about its binary (platform, digest,
/// stage0), before it is compared with the releases: known, and shown, from
/// the moment it joins the pool. The status stays empty until
/// [`Releases::machine_joined`] classifies it.
pub fn reported_binary(status: &buildlet::proto::Status, reg: &Registration) -> MachineBinary {
    let platform = reg
        .stage0
        .clone()
        .or_else(|| Platform::parse(&status.os, &status.arch).ok())
        .map(|p| p.to_string())
        .unwrap_or_default();
    MachineBinary {
        platform,
        sha256: reg.sha256.clone(),
        stage0: reg.stage0.is_some(),
        ..Default::default()
    }
}

/// The `buildlets` part of `/api/status`: releases, and how many machines
/// of the pool run which; `min` is the config's `min_buildlet_version`.
pub fn status_json(r: &Releases, pool: &Pool, min: u32) -> serde_json::Value {
    let machines = pool.snapshot();
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let mut outdated = Vec::new();
    for m in &machines {
        *counts.entry(m.binary.status.clone()).or_default() += 1;
        if m.binary.is_outdated() {
            outdated.push(json!({
                "hostname": m.hostname,
                "host_type": m.host_type,
                "platform": m.binary.platform,
                "runs": m.binary.release.clone().unwrap_or_else(|| m.binary.sha256.clone()),
                "status": m.binary.status,
                "note": m.binary.note,
            }));
        }
    }
    json!({
        "release_key": r.public_key(),
        "releases": r.all_current().iter().map(release_json).collect::<Vec<_>>(),
        "machines": machines.len(),
        "current": counts.get("current").copied().unwrap_or(0),
        "outdated": outdated.len(),
        "by_status": counts,
        "outdated_machines": outdated,
        "warnings": r.warnings(min),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_protocol_marker() {
        let mut data = vec![0u8; 1000];
        data.extend_from_slice(b"FARMER_BUILDLET");
        data.extend_from_slice(b"_INFO protocol=zz\n");
        data.extend_from_slice(buildlet::proto::BINARY_INFO.as_bytes());
        data.extend_from_slice(&[0u8; 100]);
        assert_eq!(
            binary_info(&data),
            Some((
                buildlet::proto::VERSION,
                env!("CARGO_PKG_VERSION").to_string()
            ))
        );
        assert_eq!(binary_info(b"nothing here"), None);
    }

    #[tokio::test]
    async fn publish_signs_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = local_store(dir.path());
        let key = load_or_create_key(&key_dir(dir.path()).join(PRIVATE_KEY_FILE)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key_dir(dir.path()).join(PRIVATE_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let bin = Bytes::from(format!("ELF...{}...", buildlet::proto::BINARY_INFO));
        let linux = Platform::parse("linux", "amd64").unwrap();
        let req = |data: Bytes, v: Option<&str>| PublishRequest {
            platform: linux.clone(),
            data,
            version: v.map(str::to_string),
            protocol: None,
            min_protocol: Some(1),
        };
        let p = publish(store.as_ref(), &key, req(bin.clone(), Some("v1")))
            .await
            .unwrap();
        assert!(p.changed);
        p.manifest
            .verify(&ReleaseKey::from_signing(&key), &linux)
            .unwrap();
        let again = publish(store.as_ref(), &key, req(bin.clone(), Some("v1")))
            .await
            .unwrap();
        assert!(!again.changed);
        let p2 = publish(
            store.as_ref(),
            &key,
            req(Bytes::from([&bin[..], b"x"].concat()), None),
        )
        .await
        .unwrap();
        assert!(p2.changed);
        assert!(p2.manifest.published_at > p.manifest.published_at);
        assert!(p2.manifest.version.ends_with(&p2.manifest.sha256[..12]));

        let r = Releases::with_store(dir.path(), store.clone());
        assert!(r.refresh().await);
        assert!(!r.refresh().await);
        assert_eq!(r.current(&linux).unwrap(), p2.manifest);
        assert_eq!(r.find(&linux, &p.manifest.sha256).unwrap().version, "v1");

        // Not a buildlet, below the minimum, a bad label.
        let e = publish(
            store.as_ref(),
            &key,
            req(Bytes::from_static(b"#!/bin/sh\n"), None),
        )
        .await
        .err()
        .unwrap();
        assert!(
            e.to_string()
                .contains("does not look like a farmer buildlet"),
            "{e}"
        );
        let mut low = req(bin.clone(), Some("v0"));
        low.min_protocol = Some(buildlet::proto::VERSION + 1);
        let e = publish(store.as_ref(), &key, low).await.err().unwrap();
        assert!(e.to_string().contains("min_buildlet_version"), "{e}");
        let e = publish(store.as_ref(), &key, req(bin, Some("a b")))
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("version"), "{e}");
    }
}
