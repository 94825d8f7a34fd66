//! `POST /exec`: run a command, stream its combined output, report its exit
//! state in the `Process-State` trailer, and kill its whole process tree when
//! the client goes away or the timeout passes.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use hyper::body::{Body as HttpBody, Frame};
use tokio::sync::mpsc;

use super::spawn::Child;
use super::{Buildlet, Form, ResponseBody, read_form, text};
use crate::paths;
use crate::proto::{self, ProcessState};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long to wait for output to drain after the command exited and its
/// process group was killed (a grandchild that left the group may hold the
/// pipe open forever).
pub(super) const DRAIN_GRACE: Duration = Duration::from_secs(5);

pub(super) fn bad(msg: impl std::fmt::Display) -> Response<ResponseBody> {
    text(StatusCode::BAD_REQUEST, format!("{msg}\n"))
}

/// A command ready to spawn.
struct Plan {
    program: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
    env: Vec<(OsString, OsString)>,
    timeout: Option<Duration>,
    debug: bool,
    /// `clean=1`: empty the work dir once the command is gone, before the
    /// answer ends (one request instead of an exec and a `/removeall`).
    clean: bool,
}

fn plan(b: &Buildlet, form: &Form) -> Result<Plan, String> {
    let cmd = form
        .get("cmd")
        .filter(|c| !c.is_empty())
        .ok_or("POST /exec needs a cmd form field")?;
    let sys = form.get("mode") == Some("sys");
    let mut args: Vec<String> = form.all("args").into_iter().map(str::to_string).collect();
    args.extend(form.all("cmdArg").into_iter().map(str::to_string));

    let root = &b.root;
    let mut env = base_env(root);
    add_form_env(&mut env, form)?;
    let path_entries = form.all("path");
    if !path_entries.is_empty() {
        let old = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let wd = root.to_string_lossy();
        let mut parts: Vec<OsString> = Vec::new();
        for p in path_entries {
            match p {
                "$EMPTY" => {}
                "$PATH" => parts.extend(std::env::split_paths(&old).map(OsString::from)),
                p => parts.push(p.replace("$WORKDIR", &wd).into()),
            }
        }
        let joined = std::env::join_paths(parts).map_err(|e| format!("path: {e}"))?;
        set_env(&mut env, "PATH".into(), joined);
    }

    let (program, cmd_dir) = if Path::new(cmd).is_absolute() {
        (PathBuf::from(cmd), None)
    } else if cmd.contains('/') || cmd.contains(std::path::MAIN_SEPARATOR) {
        if sys {
            return Err(format!(
                "cmd {cmd:?}: mode=sys runs system commands only; give a bare name or an absolute path"
            ));
        }
        let comps = paths::clean(cmd).map_err(|e| e.to_string())?;
        let p = paths::resolve(root, cmd, &comps, true).map_err(|e| e.to_string())?;
        let parent = p.parent().map(Path::to_path_buf);
        (p, parent)
    } else {
        let in_workdir = root.join(cmd);
        if !sys && in_workdir.is_file() {
            (in_workdir, Some(root.clone()))
        } else {
            let path_var = env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let found = lookup_path(cmd, &path_var)
                .ok_or_else(|| format!("cmd {cmd:?}: not found in the work dir or in PATH"))?;
            (found, None)
        }
    };

    let dir = match form.get("dir").filter(|d| !d.is_empty()) {
        Some(d) => resolve_dir(root, d)?,
        None if sys => root.clone(),
        None => cmd_dir.unwrap_or_else(|| root.clone()),
    };
    let timeout = match form.get("timeout").filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => match proto::parse_duration(t) {
            Some(d) if d.is_zero() => None,
            // A deadline must be representable (`Instant + d`).
            Some(d) if d > proto::MAX_EXEC_TIMEOUT => {
                return Err(format!(
                    "timeout {t:?} is longer than {:?}; pass none for no timeout",
                    proto::MAX_EXEC_TIMEOUT
                ));
            }
            Some(d) => Some(d),
            None => {
                return Err(format!(
                    "timeout {t:?} is not a duration such as 90s or 10m"
                ));
            }
        },
    };
    Ok(Plan {
        program,
        args,
        dir,
        env,
        timeout,
        debug: form.flag("debug"),
        clean: form.flag("clean"),
    })
}

/// The environment every command starts from: the buildlet's own, with
/// `TMPDIR` and `WORKDIR` pointing into the work dir and `HOME` there too
/// when the buildlet has none.
pub(super) fn base_env(root: &Path) -> Vec<(OsString, OsString)> {
    let tmp = root.join("tmp");
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    let has_home = env.iter().any(|(k, _)| k == "HOME");
    set_env(&mut env, "TMPDIR".into(), tmp.clone().into());
    set_env(&mut env, "WORKDIR".into(), root.to_path_buf().into());
    if !has_home {
        set_env(&mut env, "HOME".into(), tmp.into());
    }
    env
}

/// Applies the request's repeated `env=KEY=VALUE` fields.
pub(super) fn add_form_env(env: &mut Vec<(OsString, OsString)>, form: &Form) -> Result<(), String> {
    for kv in form.all("env") {
        let (k, v) = kv
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| format!("env {kv:?} is not of the form KEY=VALUE"))?;
        if kv.contains('\0') {
            return Err(format!("env {kv:?} contains a NUL byte"));
        }
        set_env(env, k.into(), v.into());
    }
    Ok(())
}

/// A `dir` parameter: a directory below the work dir, by the rules of
/// [`paths`].
pub(super) fn resolve_dir(root: &Path, d: &str) -> Result<PathBuf, String> {
    let comps = paths::clean(d).map_err(|e| format!("dir: {e}"))?;
    let p = paths::resolve(root, d, &comps, true).map_err(|e| format!("dir: {e}"))?;
    if !p.is_dir() {
        return Err(format!("dir {d:?}: no such directory in the work dir"));
    }
    Ok(p)
}

/// Spawns `command` as the command of `jail`, registered so that
/// [`super::contain::Containment::kill_all`] reaches it and the orphan
/// reaper leaves its exit status to tokio.
/// The start of every command the buildlet runs (an exec, a shell): only
/// `env` in its environment, plus the marker of its jail; in `dir`; killed
/// when dropped; joining its jail (the cgroup) before `exec`.
pub(super) fn contained_command(
    jail: &super::contain::Jail,
    program: &Path,
    args: &[String],
    env: &[(OsString, OsString)],
    dir: &Path,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(super::contain::SCOPE_ENV, &jail.marker)
        .current_dir(dir)
        .kill_on_drop(true);
    // SAFETY: the hook only makes async-signal-safe calls (see its docs).
    #[cfg(unix)]
    unsafe {
        command.pre_exec(jail.pre_exec_hook());
    }
    command
}

pub(super) fn spawn_contained(
    contain: &super::contain::Containment,
    jail: &mut super::contain::Jail,
    command: &mut tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    // Held from spawn to registration, so the orphan reaper cannot take
    // the child's exit status from tokio in between.
    let mut children = contain.children.lock().unwrap_or_else(|e| e.into_inner());
    let spawned = command.spawn();
    if let Ok(c) = &spawned {
        let pid = c.id().unwrap_or(0);
        children.insert(i32::try_from(pid).unwrap_or(0));
        contain.started(jail, pid, false);
    }
    spawned
}

/// Starts a command of `/exec` with its output into `stdout` and `stderr`:
/// made inside its cgroup where the kernel allows (see `super::spawn`),
/// else by [`contained_command`] and [`spawn_contained`].
fn spawn_command(
    contain: &super::contain::Containment,
    jail: &mut super::contain::Jail,
    plan: &Plan,
    stdout: std::os::fd::OwnedFd,
    stderr: std::os::fd::OwnedFd,
) -> std::io::Result<Child> {
    #[allow(unused_mut)]
    let (mut stdout, mut stderr) = (stdout, stderr);
    #[cfg(target_os = "linux")]
    if let Some(cgroup) = contain.clone3_target(jail) {
        use super::spawn::clone3;
        let mut env = plan.env.clone();
        set_env(
            &mut env,
            super::contain::SCOPE_ENV.into(),
            jail.marker.clone().into(),
        );
        let stdin = std::fs::File::open("/dev/null")?.into();
        let mut children = contain.children.lock().unwrap_or_else(|e| e.into_inner());
        let spec = clone3::Spec {
            program: &plan.program,
            args: &plan.args,
            env: &env,
            dir: &plan.dir,
            stdin,
            stdout,
            stderr,
        };
        match clone3::spawn(cgroup, spec) {
            Ok(born) => {
                tracing::debug!(
                    pid = born.pid(),
                    shared_memory = born.shared(),
                    "made in its cgroup"
                );
                children.insert(born.pid() as i32);
                contain.started(jail, born.pid(), true);
                return Ok(Child::Born(born));
            }
            Err(clone3::Failed::Start(e)) => return Err(e),
            Err(clone3::Failed::Refused(e, fds)) => {
                contain.clone3_refused(&e);
                let [_, out, err] = *fds;
                (stdout, stderr) = (out, err);
            }
        }
    }
    let mut command = contained_command(jail, &plan.program, &plan.args, &plan.env, &plan.dir);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    #[cfg(unix)]
    command.process_group(0);
    spawn_contained(contain, jail, &mut command).map(Child::Tokio)
}

pub(super) fn set_env(env: &mut Vec<(OsString, OsString)>, k: OsString, v: OsString) {
    env.retain(|(ek, _)| {
        if cfg!(windows) {
            !ek.eq_ignore_ascii_case(&k)
        } else {
            ek != &k
        }
    });
    env.push((k, v));
}

fn lookup_path(name: &str, path_var: &std::ffi::OsStr) -> Option<PathBuf> {
    for dir in std::env::split_paths(path_var) {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return Some(candidate);
        }
        if cfg!(windows) {
            for ext in ["exe", "bat", "cmd"] {
                let c = candidate.with_extension(ext);
                if c.is_file() {
                    return Some(c);
                }
            }
        }
    }
    None
}

#[cfg(unix)]
pub(super) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
pub(super) fn is_executable(p: &Path) -> bool {
    p.is_file()
}

pub(super) async fn exec<B>(b: Arc<Buildlet>, req: Request<B>) -> Response<ResponseBody>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let form = match read_form(req).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let plan = match plan(&b, &form) {
        Ok(p) => p,
        Err(e) => return bad(e),
    };
    let (reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("creating pipe: {e}\n"),
            );
        }
    };
    let writer2 = match writer.try_clone() {
        Ok(w) => w,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("creating pipe: {e}\n"),
            );
        }
    };
    let contain = b.contain.clone();
    contain.start_reaper();
    let mut jail = contain.prepare();
    let spawned = spawn_command(&contain, &mut jail, &plan, writer.into(), writer2.into());
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            contain.finish(jail);
            return bad(format!("cannot start {}: {e}", plan.program.display()));
        }
    };
    let pid = jail.pid();
    tracing::info!(pid, program = %plan.program.display(), args = ?plan.args, dir = %plan.dir.display(), "exec");

    let (tx, body) = ResponseBody::channel(16);
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(16);
    start_pump(reader, out_tx, pid);

    let debug_header = plan.debug.then(|| {
        Bytes::from(format!(
            ":: running {} {:?} in {}\n",
            plan.program.display(),
            plan.args,
            plan.dir.display()
        ))
    });
    let timeout = plan.timeout;
    let clean = plan.clean.then(|| b.clone());
    tokio::spawn(async move {
        if let Some(h) = debug_header {
            let _ = tx.send(Ok(Frame::data(h))).await;
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(sleep);
        let mut exit: Option<std::process::ExitStatus> = None;
        let mut timed_out = false;
        let mut output_done = false;
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        let mut client_gone = false;
        let mut wait_error: Option<String> = None;
        while !(output_done && (exit.is_some() || wait_error.is_some())) {
            let drain = async {
                match drain_deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                chunk = out_rx.recv(), if !output_done => match chunk {
                    Some(data) => {
                        if tx.send(Ok(Frame::data(data))).await.is_err() {
                            client_gone = true;
                            break;
                        }
                    }
                    None => output_done = true,
                },
                status = child.wait(), if exit.is_none() && wait_error.is_none() => {
                    match status {
                        Ok(s) => exit = Some(s),
                        Err(e) => wait_error = Some(e.to_string()),
                    }
                    contain.exited(&jail);
                    // Whatever the command left running dies with it (and
                    // would keep the pipe open otherwise), also what left
                    // its cgroup.
                    contain.kill(&jail);
                    drain_deadline = Some(tokio::time::Instant::now() + DRAIN_GRACE);
                }
                _ = tx.closed() => {
                    client_gone = true;
                    break;
                }
                _ = &mut sleep, if !timed_out && exit.is_none() => {
                    timed_out = true;
                    contain.kill(&jail);
                    let _ = child.start_kill();
                }
                _ = drain => {
                    tracing::warn!(pid, "output still open {DRAIN_GRACE:?} after exit; a process escaped containment");
                    output_done = true;
                }
            }
        }
        if client_gone {
            tracing::info!(pid, "client went away; killing the command");
            contain.kill(&jail);
            let _ = child.start_kill();
            let _ = child.wait().await;
            contain.exited(&jail);
            contain.finish(jail);
            return;
        }
        contain.finish(jail);
        let state = if timed_out {
            ProcessState::TimedOut(timeout.unwrap_or_default())
        } else if let Some(e) = wait_error {
            ProcessState::Error(format!("waiting for the command: {e}"))
        } else {
            exit.map_or(ProcessState::Error("no exit status".into()), to_state)
        };
        tracing::info!(pid, state = %state, "exec done");
        let mut trailers = state_trailers(&state);
        if let Some(b) = clean {
            // After the command and all it left are gone (`finish`).
            let cleaning = tokio::task::spawn_blocking(move || super::files::clean_work_dir(&b));
            let cleaned = match tokio::time::timeout(proto::CLEAN_LIMIT, cleaning).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => Err(format!("the cleaning task failed: {e}")),
                // It goes on; the answer does not wait for it.
                Err(_) => Err(format!(
                    "cleaning took longer than {:?}",
                    proto::CLEAN_LIMIT
                )),
            };
            let said = cleaned.err().unwrap_or_else(|| "ok".into());
            if let Ok(v) = HeaderValue::from_str(&said.replace(['\r', '\n'], " ")) {
                trailers.insert(proto::CLEAN_STATE_TRAILER, v);
            }
        }
        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
    });
    let trailers = if plan.clean {
        "Process-State, Clean-State"
    } else {
        "Process-State"
    };
    streaming_response(body, "text/plain; charset=utf-8", trailers)
}

/// The `Process-State` trailer of `state`.
fn state_trailers(state: &ProcessState) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&state.to_trailer()) {
        trailers.insert(proto::PROCESS_STATE_TRAILER, v);
    }
    trailers
}

/// Ends a streamed command's output with its exit state in the
/// `Process-State` trailer (`/exec`, `/shell`).
pub(super) async fn send_state(tx: &mpsc::Sender<super::body::BodyFrame>, state: &ProcessState) {
    let _ = tx.send(Ok(Frame::trailers(state_trailers(state)))).await;
}

/// The answer of a streamed command: headers at once, output as it comes,
/// the exit state in the announced `trailers` (an HTTP/1.1 server sends
/// only those).
pub(super) fn streaming_response(
    body: ResponseBody,
    content_type: &'static str,
    trailers: &'static str,
) -> Response<ResponseBody> {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::TRAILER, HeaderValue::from_static(trailers));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Reads the command's output into `tx` until every writer is gone: on
/// unix a task on the runtime (no thread made and ended per command), else
/// (or if the pipe cannot be registered) a thread of its own.
fn start_pump(reader: std::io::PipeReader, tx: mpsc::Sender<Bytes>, pid: u32) {
    #[cfg(unix)]
    let (reader, tx) = {
        let fd = std::os::fd::OwnedFd::from(reader);
        match fd
            .try_clone()
            .and_then(tokio::net::unix::pipe::Receiver::from_owned_fd)
        {
            Ok(rx) => {
                tokio::spawn(pump_output_async(rx, tx));
                return;
            }
            Err(_) => {
                // The failed registration may have made the (shared) file
                // description non-blocking; the thread reads blocking.
                use std::os::fd::AsRawFd;
                // SAFETY: fcntl on a descriptor we own.
                unsafe {
                    let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
                    if flags >= 0 {
                        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
                    }
                }
                (std::io::PipeReader::from(fd), tx)
            }
        }
    };
    std::thread::Builder::new()
        .name(format!("exec-output-{pid}"))
        .spawn(move || pump_output(reader, tx))
        .ok();
}

#[cfg(unix)]
async fn pump_output_async(mut rx: tokio::net::unix::pipe::Receiver, tx: mpsc::Sender<Bytes>) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

fn pump_output(mut reader: std::io::PipeReader, tx: mpsc::Sender<Bytes>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

pub(super) fn to_state(s: std::process::ExitStatus) -> ProcessState {
    match s.code() {
        Some(0) => ProcessState::Ok,
        Some(c) => ProcessState::Exited(c),
        None => {
            #[cfg(unix)]
            {
                use std::os::unix::process::ExitStatusExt;
                if let Some(sig) = s.signal() {
                    return ProcessState::Signaled(sig);
                }
            }
            ProcessState::Error(format!("{s}"))
        }
    }
}
