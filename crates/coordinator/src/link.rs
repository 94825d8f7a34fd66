//! The coordinator's end of a reverse link: an HTTP/2 session while the
//! machine is used, parked in between (the wire rules are in
//! [`buildlet::link`]).
//!
//! Why: an HTTP/2 client connection holds about 40 KB here (framing
//! buffers, header tables, its tasks) even when nothing crosses it, while a
//! parked link holds the TLS connection and a small task, some 12 KB. Most
//! donated machines are idle most of the time, so 10,000 of them fit in
//! about 160 MiB instead of 500.
//!
//! One task per link ([`run`]) owns the connection. It starts a session,
//! publishes its sender, and when the machine has been idle in the pool for
//! `park_after` with no request in flight, it lets the session go and parks.
//! Parked, it pings every heartbeat and drops a link that does not answer
//! within the heartbeat timeout (the HTTP/2 PINGs' job during a session). A
//! request for a parked machine wakes the task, which starts a new session
//! first: the HTTP/2 preface needs no round trip, so a woken machine costs
//! no latency. Everything that sends goes through [`LinkTransport`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use buildlet::client::{BoxError, Reply, ReqBody, Transport};
use buildlet::link::{self, Link, PING, PONG};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The link's timing, read from the farm config at each step (a SIGHUP
/// applies to connected machines too).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub heartbeat: Duration,
    pub heartbeat_timeout: Duration,
    /// Park after this long idle; `None` keeps sessions open.
    pub park_after: Option<Duration>,
}

#[derive(Clone)]
enum State {
    /// No session yet, or one ending: senders wait.
    Between,
    Session(SendRequest<ReqBody>),
    Parked,
    Closed,
}

/// What the link's task and its senders share.
pub struct Shared {
    /// A mutex and a `Notify` rather than a `watch` channel: a watch keeps
    /// eight wakers' worth of state in an allocation of its own (368 B
    /// per link, a parked link's largest part after TLS).
    state: std::sync::Mutex<State>,
    /// The state changed (waiters enable their `Notified` before reading it).
    changed: Notify,
    /// A sender found the link parked.
    wake: Notify,
    /// Requests sent whose answer's body is not dropped yet.
    in_flight: AtomicUsize,
    /// The machine speaks a protocol that parks (known after `/status`).
    parkable: AtomicBool,
}

impl Shared {
    pub fn new() -> Arc<Shared> {
        Arc::new(Shared {
            state: std::sync::Mutex::new(State::Between),
            changed: Notify::new(),
            wake: Notify::new(),
            in_flight: AtomicUsize::new(0),
            parkable: AtomicBool::new(false),
        })
    }

    /// Lets the link park once idle (the machine's protocol version allows it).
    pub fn allow_parking(&self, yes: bool) {
        self.parkable.store(yes, Ordering::Relaxed);
    }

    pub fn is_parked(&self) -> bool {
        matches!(*self.lock_state(), State::Parked)
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the state, wakes every sender waiting for a change, and returns
    /// the state before.
    fn set_state(&self, state: State) -> State {
        let before = std::mem::replace(&mut *self.lock_state(), state);
        self.changed.notify_waiters();
        before
    }
}

/// Sends requests over a link's current session, waking a parked link first.
pub struct LinkTransport(pub Arc<Shared>);

/// Counts a request as in flight while it lives (until its answer's body
/// is dropped).
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: &Arc<Shared>) -> InFlight {
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Transport for LinkTransport {
    fn send(
        &self,
        req: http::Request<ReqBody>,
    ) -> Pin<Box<dyn Future<Output = Result<http::Response<Reply>, BoxError>> + Send + '_>> {
        Box::pin(async move {
            let shared = &self.0;
            // Counted before the session is looked up, so the link cannot
            // park between the lookup and the send; and until the answer's
            // body is dropped, so it cannot park under a body being read.
            let in_flight = InFlight::new(shared);
            let resp = crate::alloc::InSession::new(send_in_session(shared, req)).await?;
            // The answer's head was decoded in the session arena; the
            // caller would free it outside, into its thread's cache, from
            // where it would go to some long-lived object and pin the
            // session's pages. So the caller gets a copy (of the bytes too:
            // header values share the session's read buffer), and the
            // original is freed here.
            let (parts, body) = resp.into_parts();
            let mut head = http::Response::new(Reply::holding(body, in_flight));
            *head.status_mut() = parts.status;
            *head.version_mut() = parts.version;
            let headers = head.headers_mut();
            for (name, value) in &parts.headers {
                let name = http::HeaderName::from_bytes(name.as_str().as_bytes())
                    .unwrap_or_else(|_| name.clone());
                let mut copy = http::HeaderValue::from_bytes(value.as_bytes())
                    .unwrap_or_else(|_| value.clone());
                copy.set_sensitive(value.is_sensitive());
                headers.append(name, copy);
            }
            crate::alloc::in_session(|| drop(parts));
            Ok(head)
        })
    }

    fn parked(&self) -> bool {
        self.0.is_parked()
    }
}

/// Sends `req` over the link's session, waking the link if it is parked.
async fn send_in_session(
    shared: &Shared,
    req: http::Request<ReqBody>,
) -> Result<http::Response<hyper::body::Incoming>, BoxError> {
    let mut sender = loop {
        // Enabled before the state is read, so a change in between wakes it.
        let mut changed = std::pin::pin!(shared.changed.notified());
        changed.as_mut().enable();
        let state = shared.lock_state().clone();
        match state {
            State::Session(s) => break s,
            State::Parked => shared.wake.notify_one(),
            State::Between => {}
            State::Closed => return Err("the machine's link is closed".into()),
        }
        changed.await;
    };
    sender.ready().await?;
    Ok(sender.send_request(req).await?)
}

/// Marks the link closed however its task ends (also when aborted), so
/// senders waiting for a session fail at once.
struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.set_state(State::Closed);
    }
}

/// Links parked since the process started (`farmer_links_parked_total`).
static PARKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times links parked since the process started.
pub fn parks_total() -> u64 {
    PARKS.load(Ordering::Relaxed)
}

/// Serves one link until it ends; returns why. `settings` is read at each
/// step; `idle_for(d)` says whether the machine has been idle in the pool
/// for at least `d`.
pub async fn run<T, S, I>(io: T, shared: Arc<Shared>, settings: S, idle_for: I) -> String
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Fn() -> Settings + Send,
    I: Fn(Duration) -> bool + Send,
{
    let _closed = CloseOnDrop(shared.clone());
    let mut link = Link::new(io);
    loop {
        // Boxed: the task's future is sized by its largest state, and a
        // parked link should cost only what parking needs.
        // In the session arena (`crate::alloc`), so that an ended session
        // leaves whole pages free rather than holes between links.
        let session = crate::alloc::in_session(|| {
            Box::pin(crate::alloc::InSession::new(session(
                link, &shared, &settings, &idle_for,
            )))
        });
        link = match session.await {
            Ok(l) => l,
            Err(why) => return why,
        };
        shared.set_state(State::Parked);
        PARKS.fetch_add(1, Ordering::Relaxed);
        if let Err(why) = parked(&mut link, &shared, &settings).await {
            return why;
        }
        shared.set_state(State::Between);
    }
}

/// One HTTP/2 session over the link: serves its senders until the link
/// breaks (an error saying why) or the machine has been idle long enough;
/// then ends the session and returns the link, ready to park.
async fn session<T, S, I>(
    link: Link<T>,
    shared: &Shared,
    settings: &S,
    idle_for: &I,
) -> Result<Link<T>, String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Fn() -> Settings,
    I: Fn(Duration) -> bool,
{
    let s = settings();
    let (session, back) = link.session();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(crate::alloc::SessionExecutor)
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(s.heartbeat))
        .keep_alive_timeout(
            s.heartbeat_timeout
                .saturating_sub(s.heartbeat)
                .max(Duration::from_secs(1)),
        )
        .keep_alive_while_idle(true)
        .handshake::<_, ReqBody>(TokioIo::new(session))
        .await
        .map_err(|e| format!("HTTP/2 over the link failed: {e}"))?;
    shared.set_state(State::Session(sender));
    // Boxed so that dropping it below ends it (hyper's connection task
    // lets the link go only once every handle of the session is gone).
    let mut conn = Box::pin(conn);
    // Serve until the link breaks or it is time to park.
    loop {
        let every = settings().park_after.map_or(Duration::from_secs(5), |p| {
            (p / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
        });
        tokio::select! {
            r = conn.as_mut() => {
                return Err(match r {
                    Ok(()) => "the machine ended the session".into(),
                    Err(e) => format!("HTTP/2: {e}"),
                });
            }
            _ = tokio::time::sleep(every) => {
                let ready = settings().park_after.is_some_and(|after| {
                    shared.parkable.load(Ordering::Relaxed)
                        && shared.in_flight.load(Ordering::Relaxed) == 0
                        && idle_for(after)
                });
                if ready {
                    // Senders look the session up after counting
                    // themselves, so one that found it before it was
                    // withdrawn is counted now: keep serving it.
                    let session = shared.set_state(State::Between);
                    if shared.in_flight.load(Ordering::SeqCst) == 0 {
                        break;
                    }
                    shared.set_state(session);
                }
            }
        }
    }
    // Park: every sender is dropped, so the HTTP/2 client says GOAWAY once
    // the streams still open (if any) are done, and lets the link go.
    let _ = tokio::time::timeout(link::RESYNC_TIMEOUT, conn.as_mut()).await;
    drop(conn);
    let mut link = match tokio::time::timeout(link::RESYNC_TIMEOUT, back).await {
        Ok(Ok(l)) => l,
        _ => return Err("parking: the session did not let the link go".into()),
    };
    match tokio::time::timeout(link::RESYNC_TIMEOUT, link.resync()).await {
        Ok(Ok(())) => Ok(link),
        Ok(Err(e)) => Err(format!("parking: {e}")),
        Err(_) => Err("parking: no end mark from the machine in time".into()),
    }
}

/// Keeps a parked link: pings every heartbeat, checks the answers, and
/// returns once a sender wants a session (after the answers to pings in
/// flight, which come before the session's bytes). An error ends the link.
///
/// One timer serves the pings and the answers' deadline, and nothing is
/// awaited while the `select!`'s futures live: this future is part of every
/// parked link's task, so its size is memory per idle machine.
async fn parked<T, S>(link: &mut Link<T>, shared: &Shared, settings: &S) -> Result<(), String>
where
    T: AsyncRead + AsyncWrite + Unpin,
    S: Fn() -> Settings,
{
    enum Event {
        Wake,
        Timer,
        Read(std::io::Result<usize>),
    }
    let mut unanswered = 0usize;
    // Since when an answer is due (the oldest unanswered ping, roughly).
    let mut due_since: Option<Instant> = None;
    let mut next_ping = Instant::now() + settings().heartbeat;
    let mut buf = [0u8; 16];
    let timer = tokio::time::sleep_until(next_ping);
    tokio::pin!(timer);
    loop {
        let s = settings();
        let deadline = due_since.map(|t| t + s.heartbeat_timeout);
        timer
            .as_mut()
            .reset(deadline.map_or(next_ping, |d| d.min(next_ping)));
        let event = tokio::select! {
            _ = shared.wake.notified() => Event::Wake,
            _ = timer.as_mut() => Event::Timer,
            r = link.read_some(&mut buf) => Event::Read(r),
        };
        match event {
            // A permit left by a sender that has its answer by now wakes
            // nobody: only a sender still counted does.
            Event::Wake => {
                if shared.in_flight.load(Ordering::SeqCst) > 0 {
                    break;
                }
            }
            Event::Timer if deadline.is_some_and(|d| Instant::now() >= d) => {
                return Err(format!(
                    "no answer to a ping on the parked link within {:?}",
                    s.heartbeat_timeout
                ));
            }
            Event::Timer => {
                if Instant::now() < next_ping {
                    continue;
                }
                // A peer that stops reading fills the socket: bounded.
                timer.as_mut().reset(Instant::now() + s.heartbeat_timeout);
                let sent = tokio::select! {
                    r = link.send(&[PING]) => r.map_err(|e| format!("pinging the parked link: {e}")),
                    _ = timer.as_mut() => Err("pinging the parked link: the machine reads nothing".to_string()),
                };
                sent?;
                unanswered += 1;
                due_since.get_or_insert_with(Instant::now);
                next_ping = Instant::now() + s.heartbeat;
            }
            Event::Read(r) => {
                let n = r.map_err(|e| format!("reading the parked link: {e}"))?;
                if n == 0 {
                    return Err("the machine closed the link".into());
                }
                answers(&buf[..n], &mut unanswered)?;
                due_since = (unanswered > 0).then(Instant::now);
            }
        }
    }
    // Answers are due (so `due_since` is set) whenever some are missing.
    let deadline = due_since.unwrap_or_else(Instant::now) + settings().heartbeat_timeout;
    timer.as_mut().reset(deadline);
    while unanswered > 0 {
        let want = unanswered.min(buf.len());
        let read = tokio::select! {
            r = link.read_some(&mut buf[..want]) => r.map_err(|e| format!("reading the parked link: {e}")),
            _ = timer.as_mut() => Err("no answer to a ping on the parked link in time".to_string()),
        };
        let n = read?;
        if n == 0 {
            return Err("the machine closed the link".into());
        }
        answers(&buf[..n], &mut unanswered)?;
    }
    Ok(())
}

/// Counts the answers in what a parked machine sent; anything else breaks
/// the protocol.
fn answers(read: &[u8], unanswered: &mut usize) -> Result<(), String> {
    for &b in read {
        if b != PONG || *unanswered == 0 {
            return Err(format!(
                "the machine sent {b:#04x} on its parked link, where only answers to pings may come"
            ));
        }
        *unanswered -= 1;
    }
    Ok(())
}

/// Gives the memory of ended sessions back to the OS: freed framing
/// buffers sit in the allocator's free lists otherwise, and a farm whose
/// machines just parked would look no lighter. Runs forever; trims at most
/// every 10 s, and only after links parked.
pub async fn trim_loop() {
    let mut seen = parks_total();
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let now = parks_total();
        if now != seen {
            seen = now;
            let _ = tokio::task::spawn_blocking(crate::alloc::release_free_memory).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_to_pings_may_come_on_a_parked_link() {
        let mut n = 2;
        answers(&[PONG], &mut n).unwrap();
        assert_eq!(n, 1);
        assert!(answers(&[PONG, PONG], &mut n).is_err());
        let mut n = 1;
        let e = answers(b"P", &mut n).unwrap_err();
        assert!(e.contains("0x50"), "{e}");
    }
}
