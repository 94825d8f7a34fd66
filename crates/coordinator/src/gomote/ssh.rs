//! The coordinator's SSH server for `gomote ssh`: a user's SSH session
//! carried to a leased machine's `/shell` endpoint.
//!
//! The machine may sit behind NAT; the coordinator already holds a link to
//! it (reverse mode), so the SSH server lives here and each session becomes
//! one [`buildlet::client::Client::shell`] request over that link. Nothing
//! reaches a machine before the key was accepted by [`SshBackend::authorize`]
//! for the instance named as the SSH user.
//!
//! Every resource a client can make the server hold is bounded: connections
//! ([`SshOptions::max_connections`], more are closed at once), time before
//! authentication ([`SshOptions::auth_timeout`], the socket is cut after),
//! authentication attempts, channels per connection, and the input buffered
//! per channel ([`INPUT_DEPTH`] SSH packets; past that the connection stops
//! reading, which is SSH's own backpressure).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use buildlet::client::{Client, ShellEvent, ShellInput, ShellOptions};
use buildlet::proto::{self, ProcessState};
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use russh::keys::{HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet, Sig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// What the SSH server asks of the farm; implemented by the gomote instance registry.
pub trait SshBackend: Send + Sync + 'static {
    /// May the key with this fingerprint (OpenSSH `SHA256:base64` form, as
    /// `ssh-keygen -lf` prints) log in to `instance` (the SSH user name)?
    /// Err says which rule refused (logged, not sent to the client beyond a
    /// generic refusal).
    fn authorize(&self, instance: &str, fingerprint: &str) -> Result<(), String>;
    /// The machine client to open the session on, plus a guard the server
    /// holds while the session lives (it keeps the lease renewed). Err says
    /// why (sent to the client on stderr of the channel, then the channel
    /// closes with exit status 255).
    fn open(&self, instance: &str) -> Result<(Client, Box<dyn Send + Sync>), String>;
}

/// How the SSH server is set up and bounded.
#[derive(Debug, Clone)]
pub struct SshOptions {
    /// The server's Ed25519 host key (OpenSSH format): created `0600` on
    /// first use, reused after, so clients' `known_hosts` stay valid.
    pub host_key: PathBuf,
    /// Connections served at once; more are closed as they arrive.
    pub max_connections: usize,
    /// From accept until the client has authenticated; then the socket is
    /// cut (slow or idle unauthenticated clients cannot pile up).
    pub auth_timeout: Duration,
    /// Failed authentication attempts before the connection is closed.
    pub max_auth_attempts: usize,
    /// Session channels open at once on one connection.
    pub max_channels: usize,
    /// How long a client may be silent, keepalives unanswered, before its
    /// connection is closed (a vanished laptop must not hold a machine).
    pub keepalive_interval: Duration,
}

impl SshOptions {
    /// Defaults that suit a farm: 256 connections, 30 s to authenticate,
    /// 6 attempts, 4 channels each, a keepalive every 30 s.
    pub fn new(host_key: impl Into<PathBuf>) -> SshOptions {
        SshOptions {
            host_key: host_key.into(),
            max_connections: 256,
            auth_timeout: Duration::from_secs(30),
            max_auth_attempts: 6,
            max_channels: 4,
            keepalive_interval: Duration::from_secs(30),
        }
    }
}

/// SSH packets of input held per channel before the connection stops
/// reading. Each is at most the server's maximum packet size (32 KiB), so
/// a channel buffers at most 1 MiB on its way to the machine.
pub const INPUT_DEPTH: usize = 32;

/// How long input may wait for a machine that does not read it before the
/// channel is closed. Reading stops for the whole connection meanwhile
/// (SSH has one reader per connection), and the machine's output cannot
/// be delivered either, so this bounds that stall.
const INPUT_STALL: Duration = Duration::from_secs(300);

/// How long a connection that was told to go gets to finish.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Longest SSH user name (instance name) passed to the backend.
const MAX_USER: usize = 128;

/// Most `env` requests honoured per channel, and their sizes.
const MAX_ENV: usize = 64;
const MAX_ENV_NAME: usize = 64;
const MAX_ENV_VALUE: usize = 4096;

/// Serves until `stop` turns true. One task per connection.
pub async fn serve(
    listener: TcpListener,
    opts: SshOptions,
    backend: Arc<dyn SshBackend>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let key = load_or_create_host_key(&opts.host_key)?;
    let fingerprint = key.public_key().fingerprint(HashAlg::Sha256);
    tracing::info!(addr = ?listener.local_addr().ok(), host_key = %fingerprint, "gomote SSH server listening");
    let config = Arc::new(russh::server::Config {
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![key],
        // The probe OpenSSH starts with ("none") is answered at once;
        // real refusals take a second, against guessing.
        auth_rejection_time: Duration::from_secs(1),
        auth_rejection_time_initial: Some(Duration::ZERO),
        max_auth_attempts: opts.max_auth_attempts,
        // An idle interactive session is legitimate; a dead peer is found
        // by keepalives instead.
        inactivity_timeout: None,
        keepalive_interval: Some(opts.keepalive_interval),
        keepalive_max: 3,
        nodelay: true,
        ..Default::default()
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.max_connections.max(1)));
    let opts = Arc::new(opts);
    let mut conns = tokio::task::JoinSet::new();
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        while conns.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(10);
                a
            }
            Err(e) => {
                // Out of descriptors and the like: wait, do not spin.
                tracing::warn!("SSH accept: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "SSH connection refused: {} connections already", opts.max_connections);
            continue;
        };
        let config = config.clone();
        let backend = backend.clone();
        let opts = opts.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            connection(stream, peer, config, backend, opts, stop).await;
            drop(slot);
        });
    }
    drop(listener);
    // Each connection saw `stop` too and is cutting its socket.
    let _ = tokio::time::timeout(KILL_GRACE * 2, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
    Ok(())
}

/// Reads the host key at `path`, or creates an Ed25519 one there (`0600`).
pub fn load_or_create_host_key(path: &Path) -> anyhow::Result<PrivateKey> {
    match std::fs::read_to_string(path) {
        Ok(pem) => PrivateKey::from_openssh(pem.as_bytes()).with_context(|| {
            format!(
                "SSH host key {}: not an OpenSSH private key",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = Seed([0; 32]);
            use ring::rand::SecureRandom;
            ring::rand::SystemRandom::new()
                .fill(&mut seed.0)
                .map_err(|_| anyhow::anyhow!("no randomness for the SSH host key"))?;
            let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed.0);
            let key = PrivateKey::from(pair);
            let pem = key
                .to_openssh(russh::keys::ssh_key::LineEnding::LF)
                .context("encoding the SSH host key")?;
            atomicfile::write_private(path, pem.as_bytes())
                .with_context(|| format!("writing the SSH host key {}", path.display()))?;
            tracing::info!(path = %path.display(), "created the SSH host key");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading the SSH host key {}", path.display())),
    }
}

/// A seed wiped when dropped.
struct Seed([u8; 32]);

impl Drop for Seed {
    fn drop(&mut self) {
        // Volatile so the wipe is not optimized away.
        for b in self.0.iter_mut() {
            // SAFETY: a valid, aligned, exclusive reference.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// The OpenSSH SHA256 fingerprint of a public key line (`ssh-ed25519
/// AAAA... comment`) — used by `farmer user add-key` to validate and store
/// keys. Err on anything that is not a public key, and on RSA keys, which
/// this server cannot verify (it is built without RSA).
pub fn fingerprint_of_openssh_line(line: &str) -> Result<String, String> {
    let line = line.trim();
    if line.is_empty() {
        return Err("empty public key".into());
    }
    if line.contains('\n') {
        return Err("more than one line; give one public key".into());
    }
    if line.starts_with("-----BEGIN") {
        return Err("this is a private key; give the public key (the .pub file)".into());
    }
    let key = PublicKey::from_openssh(line).map_err(|e| {
        format!("not an OpenSSH public key line (`ssh-ed25519 AAAA... comment`): {e}")
    })?;
    if matches!(key.algorithm(), russh::keys::Algorithm::Rsa { .. }) {
        return Err(
            "RSA keys are not accepted; make an Ed25519 key with `ssh-keygen -t ed25519`".into(),
        );
    }
    Ok(key.fingerprint(HashAlg::Sha256).to_string())
}

/// Cuts a connection from outside its task: the socket fails on its next
/// use (and wakes a task waiting on it), and the handler's waits end.
struct KillSwitch {
    killed: AtomicBool,
    waker: AtomicWaker,
    tx: watch::Sender<bool>,
}

impl KillSwitch {
    fn new() -> Arc<KillSwitch> {
        Arc::new(KillSwitch {
            killed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            tx: watch::channel(false).0,
        })
    }

    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.tx.send_replace(true);
        self.waker.wake();
    }

    async fn killed(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|k| *k).await;
    }

    fn check(&self, cx: &mut Context<'_>) -> std::io::Result<()> {
        self.waker.register(cx.waker());
        if self.killed.load(Ordering::SeqCst) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "connection closed by the server",
            ));
        }
        Ok(())
    }
}

/// The TCP stream under a [`KillSwitch`].
struct Killable {
    inner: TcpStream,
    switch: Arc<KillSwitch>,
}

impl AsyncRead for Killable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Err(e) = self.switch.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Killable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Err(e) = self.switch.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Err(e) = self.switch.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one connection until it ends, is not authenticated in time, or
/// the server stops.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<russh::server::Config>,
    backend: Arc<dyn SshBackend>,
    opts: Arc<SshOptions>,
    mut stop: watch::Receiver<bool>,
) {
    let switch = KillSwitch::new();
    let (authed_tx, mut authed) = watch::channel(false);
    let handler = Conn {
        backend,
        peer,
        max_channels: opts.max_channels,
        instance: None,
        authed: authed_tx,
        channels: HashMap::new(),
        switch: switch.clone(),
    };
    let stream = Killable {
        inner: stream,
        switch: switch.clone(),
    };
    let deadline = tokio::time::Instant::now() + opts.auth_timeout;
    // The version exchange happens here, before the session runs on its own.
    let started = tokio::select! {
        s = tokio::time::timeout_at(deadline, russh::server::run_stream(config, stream, handler)) => s,
        _ = stop.wait_for(|s| *s) => return,
    };
    let running = match started {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "SSH connection failed: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "SSH client sent no version within {:?}", opts.auth_timeout);
            return;
        }
    };
    let mut running = std::pin::pin!(running);
    let mut deadline_armed = true;
    loop {
        tokio::select! {
            r = running.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, "SSH connection ended: {e}");
                }
                return;
            }
            _ = tokio::time::sleep_until(deadline), if deadline_armed => {
                deadline_armed = false;
                if !*authed.borrow_and_update() {
                    tracing::info!(%peer, "SSH client not authenticated within {:?}; closing", opts.auth_timeout);
                    break;
                }
            }
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    switch.kill();
    let _ = tokio::time::timeout(KILL_GRACE, running).await;
}

/// One session channel.
struct Chan {
    /// From `pty-req`: TERM, columns, rows.
    pty: Option<(String, u16, u16)>,
    env: Vec<String>,
    /// Feeds the machine's `/shell` request once the session started.
    input: Option<mpsc::Sender<ShellInput>>,
    started: bool,
    /// Dropped with the channel (closed, or the connection gone): the
    /// session task then drops the machine session, which kills it.
    _alive: oneshot::Sender<()>,
    alive_rx: Option<oneshot::Receiver<()>>,
}

/// The per-connection handler.
struct Conn {
    backend: Arc<dyn SshBackend>,
    peer: SocketAddr,
    max_channels: usize,
    /// The instance the client authenticated for.
    instance: Option<String>,
    authed: watch::Sender<bool>,
    channels: HashMap<ChannelId, Chan>,
    switch: Arc<KillSwitch>,
}

/// A column or row count from the client: 0 means "not said".
fn dim(v: u32, default: u16) -> u16 {
    if v == 0 {
        default
    } else {
        v.min(u32::from(proto::SHELL_MAX_DIM)) as u16
    }
}

/// Environment names passed on: shell identifiers of sane length.
fn sane_env(name: &str, value: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= MAX_ENV_NAME
        && value.len() <= MAX_ENV_VALUE
        && !value.contains('\0')
}

impl Conn {
    fn check_key(&self, user: &str, key: &PublicKey) -> bool {
        if user.is_empty() || user.len() > MAX_USER || user.chars().any(|c| c.is_control()) {
            tracing::info!(peer = %self.peer, "SSH login refused: unusable user name");
            return false;
        }
        let fp = key.fingerprint(HashAlg::Sha256).to_string();
        match self.backend.authorize(user, &fp) {
            Ok(()) => true,
            Err(why) => {
                tracing::info!(peer = %self.peer, instance = user, key = %fp, "SSH login refused: {why}");
                false
            }
        }
    }

    /// Passes input to the machine, waiting while its buffer is full (which
    /// stops this connection's reading: backpressure). A session that ended
    /// drops it; a machine that stops reading for [`INPUT_STALL`] loses the
    /// channel.
    async fn send_input(
        &mut self,
        channel: ChannelId,
        input: ShellInput,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(tx) = self.channels.get(&channel).and_then(|c| c.input.clone()) else {
            return Ok(());
        };
        let switch = self.switch.clone();
        tokio::select! {
            // An error: the session ended; its exit is on the way.
            _ = tx.send(input) => Ok(()),
            _ = tokio::time::sleep(INPUT_STALL) => {
                tracing::warn!(peer = %self.peer, "machine read no input for {INPUT_STALL:?}; closing the channel");
                self.channels.remove(&channel);
                let _ = session.close(channel);
                Ok(())
            }
            _ = switch.killed() => Err(russh::Error::Disconnect),
        }
    }

    /// A `shell` or `exec` request: opens the machine session.
    fn start(
        &mut self,
        channel: ChannelId,
        command: Option<String>,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let (Some(instance), Some(chan)) = (self.instance.clone(), self.channels.get_mut(&channel))
        else {
            return session.channel_failure(channel);
        };
        if chan.started {
            return session.channel_failure(channel);
        }
        chan.started = true;
        session.channel_success(channel)?;
        let (client, guard) = match self.backend.open(&instance) {
            Ok(c) => c,
            Err(why) => {
                tracing::info!(peer = %self.peer, %instance, "SSH session refused: {why}");
                session.extended_data(channel, 1, Bytes::from(format!("farmer: {why}\r\n")))?;
                session.exit_status_request(channel, 255)?;
                session.eof(channel)?;
                return session.close(channel);
            }
        };
        let (d_cols, d_rows) = proto::SHELL_DEFAULT_SIZE;
        let (term, cols, rows) =
            chan.pty
                .clone()
                .unwrap_or((proto::SHELL_DEFAULT_TERM.to_string(), d_cols, d_rows));
        let opts = ShellOptions {
            term,
            cols,
            rows,
            pty: chan.pty.is_some(),
            command,
            env: chan.env.clone(),
            dir: None,
        };
        let (tx, rx) = mpsc::channel(INPUT_DEPTH);
        chan.input = Some(tx);
        let alive = chan.alive_rx.take();
        tracing::info!(peer = %self.peer, %instance, pty = opts.pty, command = ?opts.command, "SSH session");
        let task = ChannelTask {
            handle: session.handle(),
            channel,
            peer: self.peer,
        };
        let switch = self.switch.clone();
        tokio::spawn(async move {
            // Held while the session lives: it keeps the lease renewed.
            let _guard = guard;
            let ended = async {
                match alive {
                    Some(a) => {
                        let _ = a.await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = task.run(client, opts, rx) => {}
                // The channel closed or the connection went: dropping the
                // machine session kills its processes.
                _ = ended => {}
                _ = switch.killed() => {}
            }
        });
        Ok(())
    }
}

/// Copies one machine session to its SSH channel.
struct ChannelTask {
    handle: russh::server::Handle,
    channel: ChannelId,
    peer: SocketAddr,
}

impl ChannelTask {
    async fn run(&self, client: Client, opts: ShellOptions, rx: mpsc::Receiver<ShellInput>) {
        let mut session = match client.shell(&opts, rx).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(peer = %self.peer, "opening the machine session: {e}");
                return self
                    .fail(&format!("cannot open a session on the machine: {e}"))
                    .await;
            }
        };
        loop {
            match session.next().await {
                Ok(ShellEvent::Output(data)) => {
                    // Waits while the client's window is full.
                    if self.handle.data(self.channel, data).await.is_err() {
                        return;
                    }
                }
                Ok(ShellEvent::Exit(state)) => return self.exit(state).await,
                Err(e) => {
                    tracing::info!(peer = %self.peer, "machine session broke off: {e}");
                    return self
                        .fail(&format!("the machine session broke off: {e}"))
                        .await;
                }
            }
        }
    }

    /// Reports a failure on stderr, exit status 255 (what `ssh` itself
    /// uses for its own errors), and closes the channel.
    async fn fail(&self, msg: &str) {
        let _ = self
            .handle
            .extended_data(self.channel, 1, Bytes::from(format!("farmer: {msg}\r\n")))
            .await;
        self.close(Some(255)).await;
    }

    async fn exit(&self, state: ProcessState) {
        match state {
            ProcessState::Ok => self.close(Some(0)).await,
            ProcessState::Exited(c) => self.close(Some(u32::try_from(c).unwrap_or(255))).await,
            ProcessState::Signaled(n) => {
                let _ = self
                    .handle
                    .exit_signal_request(
                        self.channel,
                        signal(n),
                        false,
                        String::new(),
                        String::new(),
                    )
                    .await;
                self.close(None).await;
            }
            other => self.fail(&format!("the session ended: {other}")).await,
        }
    }

    async fn close(&self, status: Option<u32>) {
        if let Some(s) = status {
            let _ = self.handle.exit_status_request(self.channel, s).await;
        }
        let _ = self.handle.eof(self.channel).await;
        let _ = self.handle.close(self.channel).await;
    }
}

/// An SSH signal name for a machine's signal number. Only the numbers
/// POSIX systems agree on are named; the machine may not run the
/// coordinator's OS.
fn signal(n: i32) -> Sig {
    match n {
        1 => Sig::HUP,
        2 => Sig::INT,
        3 => Sig::QUIT,
        4 => Sig::ILL,
        6 => Sig::ABRT,
        8 => Sig::FPE,
        9 => Sig::KILL,
        11 => Sig::SEGV,
        13 => Sig::PIPE,
        14 => Sig::ALRM,
        15 => Sig::TERM,
        n => Sig::Custom(format!("SIG{n}")),
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // Spares the client a signature for a key that would be refused.
        Ok(if self.check_key(user, offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if !self.check_key(user, key.public_key) {
            return Ok(Auth::reject());
        }
        tracing::info!(peer = %self.peer, instance = user, key = %key.public_key.fingerprint(HashAlg::Sha256), "SSH login");
        self.instance = Some(user.to_string());
        self.authed.send_replace(true);
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The channel's own message stream is not used (the callbacks
        // below are); dropping it makes russh skip it.
        if self.instance.is_none() {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        if self.channels.len() >= self.max_channels {
            tracing::info!(peer = %self.peer, "SSH channel refused: {} open already", self.max_channels);
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        let id = channel.id();
        let (alive, alive_rx) = oneshot::channel();
        self.channels.insert(
            id,
            Chan {
                pty: None,
                env: Vec::new(),
                input: None,
                started: false,
                _alive: alive,
                alive_rx: Some(alive_rx),
            },
        );
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::info!(peer = %self.peer, "SSH port forwarding to {host_to_connect}:{port_to_connect} refused");
        reply
            .reject(ChannelOpenFailure::Other {
                code: 1,
                reason: "port forwarding is not supported by farmer".into(),
            })
            .await;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        tracing::info!(peer = %self.peer, "SSH remote forwarding of {address}:{port} refused");
        Ok(false)
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send_input(channel, ShellInput::Eof, session).await
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let input = ShellInput::Data(Bytes::copy_from_slice(data));
        self.send_input(channel, input, session).await
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Terminal modes are left to the machine's defaults.
        let Some(chan) = self.channels.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        // A client without TERM sends an empty one: the default then.
        let term = if term.is_empty() {
            proto::SHELL_DEFAULT_TERM
        } else {
            term
        };
        if chan.started || !proto::valid_term(term) {
            return session.channel_failure(channel);
        }
        let (dc, dr) = proto::SHELL_DEFAULT_SIZE;
        chan.pty = Some((term.to_string(), dim(col_width, dc), dim(row_height, dr)));
        session.channel_success(channel)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(chan) = self.channels.get_mut(&channel) else {
            return Ok(());
        };
        let Some(pty) = &mut chan.pty else {
            return Ok(());
        };
        pty.1 = dim(col_width, pty.1);
        pty.2 = dim(row_height, pty.2);
        let (cols, rows) = (pty.1, pty.2);
        if chan.started {
            self.send_input(channel, ShellInput::Resize { cols, rows }, session)
                .await?;
        }
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(chan) = self.channels.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        if chan.started || chan.env.len() >= MAX_ENV || !sane_env(variable_name, variable_value) {
            return session.channel_failure(channel);
        }
        chan.env.push(format!("{variable_name}={variable_value}"));
        session.channel_success(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, None, session)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match std::str::from_utf8(data) {
            Ok(cmd) if !cmd.is_empty() && !cmd.contains('\0') => {
                self.start(channel, Some(cmd.to_string()), session)
            }
            _ => {
                tracing::info!(peer = %self.peer, "SSH exec refused: not a UTF-8 command line");
                session.channel_failure(channel)
            }
        }
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::info!(peer = %self.peer, "SSH subsystem {name:?} refused (sftp and others are not supported; use gomote put/get)");
        session.channel_failure(channel)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_match_ssh_keygen_and_refuse_garbage() {
        // `ssh-keygen -lf` of this key prints this fingerprint.
        let line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILEgbTDQzooyOi6XC+3uz95owtuy5zAA3rTNMJWOXh84 farmer@test";
        assert_eq!(
            fingerprint_of_openssh_line(&format!("  {line}\n")).unwrap(),
            "SHA256:qE7Hs3DvyZsCPluIE92tN/xHqKqQziXYHDMw1ksmtgA"
        );
        assert!(fingerprint_of_openssh_line("").is_err());
        assert!(fingerprint_of_openssh_line("ssh-ed25519 AAAAnotbase64!").is_err());
        assert!(fingerprint_of_openssh_line("-----BEGIN OPENSSH PRIVATE KEY-----").is_err());
        assert!(fingerprint_of_openssh_line(&format!("{line}\n{line}")).is_err());
    }

    #[test]
    fn sizes_and_env_names() {
        assert_eq!(dim(0, 80), 80);
        assert_eq!(dim(5000, 80), proto::SHELL_MAX_DIM);
        assert_eq!(dim(132, 80), 132);
        assert!(sane_env("LANG", "C.UTF-8"));
        assert!(sane_env("_X1", ""));
        assert!(!sane_env("1X", "v"));
        assert!(!sane_env("A-B", "v"));
        assert!(!sane_env("A", "v\0"));
        assert!(!sane_env("", "v"));
    }
}
