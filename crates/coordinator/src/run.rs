//! Starting and stopping a whole coordinator: config, keys, TLS, store
//! recovery, the listener, the background loops and the local pool.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::farm::{Farm, FarmOptions};
use crate::keys::{MasterKey, write_private};
use crate::sources::LocalTarget;
use crate::store::{Location, Store};

/// How to run a coordinator.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub listen: String,
    /// Accept reverse buildlets without TLS (loopback only).
    pub allow_plaintext: bool,
    /// Certificate and key (PEM); default: a self-signed pair in the data dir.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Program (and leading args) that runs a buildlet for the local pool.
    pub local_buildlet: Option<Vec<String>>,
    /// Where the gomote SSH server listens (`None`: no SSH).
    pub ssh_listen: Option<String>,
    /// Where the store lives (`None`: `farmer.db` in the data dir).
    pub store: Option<crate::store::Location>,
}

/// What a started coordinator tells its caller.
pub struct Started {
    pub farm: Arc<Farm>,
    pub addr: SocketAddr,
}

/// The SQLite store inside the data dir, unless the store is elsewhere.
pub const STORE_FILE: &str = "farmer.db";

/// The admin token file inside the data dir.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

fn admin_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => {
            let mut t = [0u8; 24];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut t);
            let t = hex::encode(t);
            write_private(&path, format!("{t}\n").as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(t)
        }
    }
}

/// Runs a coordinator until `shutdown` resolves, then stops the local pool.
/// `on_start` is called once the port is bound and everything runs.
pub async fn run(
    opts: RunOptions,
    on_start: impl FnOnce(&Started),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("creating data dir {}", opts.data_dir.display()))?;
    // Secrets live in the data dir: only its owner may enter it, and no
    // process of the same user (a local build) may read our memory.
    #[cfg(unix)]
    {
        crate::sandbox::restrict_dir(&opts.data_dir).with_context(|| {
            format!("making data dir {} private (0700)", opts.data_dir.display())
        })?;
        crate::sandbox::protect_self();
    }
    let config = match crate::config::load(&opts.config) {
        Ok(c) => c,
        Err(errs) => bail!("the config has errors; not starting:\n{errs}"),
    };
    crate::secrets::Secrets::load(&config.secrets, &opts.data_dir)
        .context("reading the farm's secrets; not starting")?;
    let master = MasterKey::load_or_create(&opts.data_dir)?;
    let token = admin_token(&opts.data_dir)?;
    let tls_dir = opts.data_dir.join("tls");
    std::fs::create_dir_all(&tls_dir)?;
    let (cert, key) = match (&opts.tls_cert, &opts.tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        (None, None) => (tls_dir.join("cert.pem"), tls_dir.join("key.pem")),
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let host = buildlet::server::default_hostname();
    if !names.contains(&host) {
        names.push(host);
    }
    let identity = crate::tls::load_or_create(&cert, &key, &names)?;
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}: is another farmer (or something else) using that port? Pick another with --listen", opts.listen))?;
    let addr = listener.local_addr()?;
    let location = opts
        .store
        .clone()
        .unwrap_or_else(|| Location::Sqlite(opts.data_dir.join(STORE_FILE)));
    let artifacts = crate::artifacts::open(
        config.serve.storage.as_ref(),
        &opts.data_dir.join(crate::release::ARTIFACTS_DIR),
    )?;
    // A bucket that is missing or refuses the credentials is found now,
    // not when the first log is written.
    artifacts
        .check()
        .await
        .with_context(|| format!("checking the artifact store ({})", artifacts.describe()))?;
    tracing::info!(artifacts = %artifacts.describe(), "artifact store");
    // Logs go where every coordinator of the farm reads them: a bucket, or
    // the data dir of a farm on SQLite (one coordinator); else in the rows.
    let shared =
        config.serve.storage.is_some() || location.engine() == crate::store::Engine::Sqlite;
    let store = Store::connect(&location)
        .await
        .context("opening the store")?
        .with_blobs(artifacts.clone(), shared);
    tracing::info!(store = %location, "store opened");
    let mut lock = store
        .leader_lock()
        .await
        .context("connecting for the leader lock")?;
    // How the others name this coordinator when it leads.
    let me = if addr.ip().is_unspecified() {
        format!("{}:{}", buildlet::server::default_hostname(), addr.port())
    } else {
        addr.to_string()
    };
    let leading = lock
        .try_acquire(&store, &me)
        .await
        .context("trying for the leader lock")?;
    let farm = Farm::new(FarmOptions {
        data_dir: opts.data_dir.clone(),
        config,
        store,
        master,
        admin_token: token,
        allow_plaintext: opts.allow_plaintext,
        tls_fingerprint: Some(identity.fingerprint.clone()),
        tls_spki_pin: Some(identity.spki_pin.clone()),
        artifacts: Some(artifacts),
    });
    // Nothing that changes the farm is served until it leads and its queue
    // is loaded (a standby answers 503 to those).
    farm.set_leading(false);
    farm.set_http_addr(addr.to_string());
    let router = crate::api::router(farm.clone())
        .merge(crate::dashboard::router(farm.clone()))
        .merge(crate::machine_auth::serve::router(farm.clone()))
        .merge(crate::release::serve::router(farm.clone()))
        .merge(crate::gomote::api::router(farm.clone()))
        .merge(crate::forge::hooks::router(farm.clone()))
        .layer(axum::middleware::from_fn_with_state(
            farm.clone(),
            crate::leadership::standby_gate,
        ))
        // No request the coordinator serves needs more; axum answers 413.
        .layer(axum::extract::DefaultBodyLimit::max(256 << 10));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(crate::server::serve(
        listener,
        router,
        Some(identity.config.clone()),
    ));
    // SIGHUP reloads the config; a standby (whose default action would be
    // to die) only notes it: it reads the config when it takes over.
    #[cfg(unix)]
    {
        let f = farm.clone();
        tasks.spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                if !f.leading() {
                    tracing::info!(
                        "standby: the config is read again when this coordinator takes over"
                    );
                } else if let Err(e) = f.reload() {
                    tracing::error!("config reload failed; keeping the old config:\n{e}");
                }
            }
        });
    }
    let mut on_start = Some(on_start);
    if !leading {
        let leader = farm.store.leader().await.ok().flatten();
        tracing::warn!(
            leader = leader.as_ref().map_or("(unknown)", |l| l.addr.as_str()),
            "standby: another coordinator leads on this store; serving the dashboard and the read API, and taking over if it stops"
        );
        if let Some(f) = on_start.take() {
            f(&Started {
                farm: farm.clone(),
                addr,
            });
        }
        let wait = crate::leadership::acquire(&farm.store, &me);
        lock = tokio::select! {
            l = wait => l,
            _ = shutdown.as_mut() => {
                tasks.abort_all();
                return Ok(());
            }
        };
        tracing::warn!("leading now: recovering what the previous leader left running");
        // A standby's config may be days old: read again before anything
        // runs on it (the secrets hidden from local builds included).
        if let Err(e) = farm.read_config_again() {
            tracing::error!(
                "reading the config again at takeover failed; going on with the one read at start:\n{e}"
            );
        }
    }
    // Fenced before anything is recovered: no other coordinator writes
    // from here on (see `store::leader`).
    let ended = farm
        .store
        .fence_others()
        .await
        .context("ending other coordinators' connections")?;
    if ended > 0 {
        tracing::warn!(
            ended,
            "ended the connections of other coordinators to the store"
        );
    }
    if farm.store.engine() == crate::store::Engine::Postgres {
        tasks.spawn(crate::leadership::watch(lock));
    }
    let rec = farm.store.recover().await?;
    if rec.lost_attempts > 0 || rec.requeued_builds > 0 {
        tracing::warn!(
            lost_attempts = rec.lost_attempts,
            requeued = rec.requeued_builds,
            "recovered from an unclean stop: attempts that were running are recorded as lost and their builds re-queued"
        );
    }
    let resumed = crate::gomote::resume(&farm).await?;
    if resumed > 0 {
        tracing::info!(resumed, "gomote instances resumed from the store");
    }
    let queued = farm.load_queue().await?;
    if queued > 0 {
        tracing::info!(queued, "queued builds loaded from the store");
    }
    farm.set_leading(true);
    tasks.spawn(farm.clone().dispatch_loop());
    tasks.spawn(farm.clone().health_loop());
    tasks.spawn(crate::link::trim_loop());
    tasks.spawn(farm.clone().sample_loop());
    tasks.spawn(crate::gomote::expiry_loop(farm.clone()));
    tasks.spawn(crate::forge::outbox::deliver_loop(farm.clone()));
    let (stop_ssh, ssh_stopped) = tokio::sync::watch::channel(false);
    if let Some(l) = &opts.ssh_listen {
        let listener = tokio::net::TcpListener::bind(l).await.with_context(|| {
            format!("cannot listen for SSH on {l}; pick another with --ssh-listen")
        })?;
        farm.set_ssh_addr(listener.local_addr()?.to_string());
        let ssh_opts =
            crate::gomote::ssh::SshOptions::new(opts.data_dir.join("ssh_host_ed25519_key"));
        let gate = Arc::new(crate::gomote::SshGate(farm.clone()));
        tasks.spawn(async move {
            if let Err(e) = crate::gomote::ssh::serve(listener, ssh_opts, gate, ssh_stopped).await {
                tracing::error!("the gomote SSH server stopped: {e:#}");
            }
        });
    }
    tasks.spawn(crate::machine_auth::check::check_loop(farm.clone()));
    tasks.spawn(crate::release::upgrade_loop(
        farm.releases.clone(),
        farm.pool.clone(),
    ));
    let connect = match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
        SocketAddr::V6(a) if a.ip().is_unspecified() => format!("[::1]:{}", a.port()),
        a => a.to_string(),
    };
    // What no local build may read: the data dir, and the TLS key and the
    // config wherever they are kept.
    let mut secrets = vec![
        opts.data_dir.clone(),
        key.clone(),
        cert.clone(),
        opts.config.clone(),
    ];
    // Secrets and forge passwords kept outside the data dir, too.
    {
        let cfg = farm.config();
        secrets.extend(cfg.secrets.values().filter_map(|s| match s {
            crate::secrets::Source::File(p) => Some(p.clone()),
            _ => None,
        }));
        secrets.extend(
            cfg.repos
                .values()
                .filter_map(|r| r.auth.password_file.clone()),
        );
    }
    let target = match &opts.local_buildlet {
        Some(p) => LocalTarget {
            addr: connect,
            pin: Some(identity.fingerprint.clone()),
            program: p.clone(),
            secrets,
        },
        None => LocalTarget::this_exe(connect, Some(identity.fingerprint.clone()), secrets)?,
    };
    farm.sources.set_target(target);
    let started = farm.apply_config();
    tracing::debug!(?started, "pollers and machine sources started");
    if let Some(f) = on_start.take() {
        f(&Started {
            farm: farm.clone(),
            addr,
        });
    }
    shutdown.await;
    tracing::info!(
        "stopping: machine sources first (local buildlets stop, exec machines are destroyed)"
    );
    let _ = stop_ssh.send(true);
    farm.stop(std::time::Duration::from_secs(120)).await;
    tasks.abort_all();
    Ok(())
}
