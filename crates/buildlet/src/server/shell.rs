//! `POST /shell`: an interactive session streamed both ways over one
//! request, the machine side of `gomote ssh`.
//!
//! The coordinator carries a user's SSH session to the machine over the
//! link the machine already has (reverse mode works behind NAT), so the
//! session must fit in one HTTP request: input frames in the request body
//! ([`proto::FrameDecoder`]), raw output in the response body, the exit
//! state in the `Process-State` trailer as for `/exec`. The shell runs
//! under a pseudo-terminal (or plain pipes with `pty=0`) and is contained
//! like an `/exec` command: a client that goes away, `/halt`, a bad frame
//! or the main process exiting kills every process of the session.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Body as HttpBody;

use super::{Buildlet, Form, ResponseBody, query_pairs, text};
use crate::proto;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A session ready to start.
#[cfg_attr(not(unix), allow(dead_code))]
struct Plan {
    program: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
    env: Vec<(OsString, OsString)>,
    /// `Some((cols, rows))` runs under a terminal of that size.
    pty: Option<(u16, u16)>,
}

fn dim(form: &Form, key: &str, default: u16) -> Result<u16, String> {
    match form.get(key) {
        None => Ok(default),
        Some(v) => v
            .parse::<u16>()
            .ok()
            .filter(|n| proto::valid_dim(*n))
            .ok_or_else(|| {
                format!(
                    "{key} {v:?} is not a number in 1..={}",
                    proto::SHELL_MAX_DIM
                )
            }),
    }
}

fn plan(root: &Path, form: &Form) -> Result<Plan, String> {
    let term_given = form.get("term");
    let term = term_given.unwrap_or(proto::SHELL_DEFAULT_TERM);
    if !proto::valid_term(term) {
        return Err(format!(
            "term {term:?} is not 1 to {} visible ASCII characters",
            proto::SHELL_MAX_TERM
        ));
    }
    let (dc, dr) = proto::SHELL_DEFAULT_SIZE;
    let cols = dim(form, "cols", dc)?;
    let rows = dim(form, "rows", dr)?;
    let pty = match form.get("pty") {
        None | Some("1") => true,
        Some("0") => false,
        Some(v) => return Err(format!("pty {v:?} is neither 1 nor 0")),
    };
    let cmd = match form.get("cmd") {
        Some("") => return Err("cmd is empty; leave it out for an interactive shell".into()),
        Some(c) if c.contains('\0') => return Err("cmd contains a NUL byte".into()),
        other => other,
    };
    let dir = match form.get("dir").filter(|d| !d.is_empty()) {
        Some(d) => super::exec::resolve_dir(root, d)?,
        None => root.to_path_buf(),
    };
    let mut env = super::exec::base_env(root);
    // The buildlet's own $SHELL, chosen before the client's `env=` values:
    // a client picks the command, not the interpreter of the login.
    let program = user_shell(&env);
    super::exec::add_form_env(&mut env, form)?;
    // As sshd does: TERM describes a terminal, so it is set when there is
    // one, or when the client said what it is; after the client's `env=`,
    // so only the checked `term` names it.
    if pty || term_given.is_some() {
        super::exec::set_env(&mut env, "TERM".into(), term.into());
    }
    // A login shell reads the profile, so an interactive session looks
    // like an ssh login to the machine; with a command, `-c` runs it as
    // sshd would (through the user's shell, without the profile).
    let args = match cmd {
        Some(c) => vec!["-c".to_string(), c.to_string()],
        None => vec!["-l".to_string()],
    };
    Ok(Plan {
        program,
        args,
        dir,
        env,
        pty: pty.then_some((cols, rows)),
    })
}

/// `$SHELL` of the session's environment when it names an executable by an
/// absolute path, else `/bin/sh`: a relative or missing `SHELL` would be
/// looked up who knows where.
fn user_shell(env: &[(OsString, OsString)]) -> PathBuf {
    env.iter()
        .find(|(k, _)| k == "SHELL")
        .map(|(_, v)| PathBuf::from(v))
        .filter(|p| p.is_absolute() && super::exec::is_executable(p))
        .unwrap_or_else(|| PathBuf::from("/bin/sh"))
}

pub(super) async fn shell<B>(b: Arc<Buildlet>, req: Request<B>) -> Response<ResponseBody>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let form = Form(query_pairs(&req));
    let plan = match plan(&b.root, &form) {
        Ok(p) => p,
        Err(e) => return super::exec::bad(e),
    };
    imp::run(b, plan, req.into_body()).await
}

#[cfg(not(unix))]
mod imp {
    use super::*;

    /// Terminals and `setsid` are Unix; a Windows session would need
    /// ConPTY and job objects, which nobody has asked for yet.
    pub(super) async fn run<B>(_b: Arc<Buildlet>, _plan: Plan, _body: B) -> Response<ResponseBody> {
        text(
            StatusCode::NOT_IMPLEMENTED,
            "interactive sessions are not supported on this platform (Unix only)\n",
        )
    }
}

#[cfg(unix)]
mod imp {
    use std::fs::File;
    use std::io::{self, Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::process::Stdio;

    use http_body_util::BodyExt;
    use hyper::body::Frame;
    use tokio::io::unix::AsyncFd;

    use super::*;
    use crate::proto::{FrameDecoder, ProcessState, ShellInput};

    /// Most bytes read from the terminal per output chunk.
    const READ_CHUNK: usize = 32 * 1024;

    /// The parent's ends of a session's terminal or pipes.
    struct Ends {
        /// What the session prints (the pty master, or the merged pipe).
        output: Arc<AsyncFd<File>>,
        /// Where its input goes (the same master, or stdin's pipe).
        input: Arc<AsyncFd<File>>,
        /// The master, for window size changes; `None` without a terminal.
        master: Option<Arc<AsyncFd<File>>>,
    }

    fn internal(what: &str, e: io::Error) -> Response<ResponseBody> {
        text(StatusCode::INTERNAL_SERVER_ERROR, format!("{what}: {e}\n"))
    }

    fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
        // SAFETY: fcntl on a descriptor we own, with integer arguments.
        unsafe {
            let flags = cvt(libc::fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
            cvt(libc::fcntl(
                fd.as_raw_fd(),
                libc::F_SETFL,
                flags | libc::O_NONBLOCK,
            ))?;
        }
        Ok(())
    }

    /// Sets the terminal's window size; the kernel sends `SIGWINCH` to its
    /// foreground process group when it changes.
    fn set_winsize(fd: RawFd, cols: u16, rows: u16) -> io::Result<()> {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer given.
        cvt(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ as _, &ws) }).map(|_| ())
    }

    /// Opens a pseudo-terminal pair, both ends close-on-exec from the
    /// start: a command another request spawns meanwhile must not inherit
    /// the terminal (holding the slave open, it would keep the session's
    /// output from ever ending).
    #[cfg(target_os = "linux")]
    fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
        // SAFETY: plain libc calls; every descriptor returned is owned at
        // once, and ptsname_r writes at most `buf.len()` bytes.
        unsafe {
            let m = cvt(libc::posix_openpt(
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            ))?;
            let master = OwnedFd::from_raw_fd(m);
            cvt(libc::grantpt(m))?;
            cvt(libc::unlockpt(m))?;
            let mut buf = [0 as libc::c_char; 128];
            let r = libc::ptsname_r(m, buf.as_mut_ptr(), buf.len());
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r));
            }
            let s = cvt(libc::open(
                buf.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            ))?;
            Ok((master, OwnedFd::from_raw_fd(s)))
        }
    }

    /// Opens a pseudo-terminal pair (other Unix). `openpty` cannot set
    /// close-on-exec atomically, so a command spawned by another request
    /// in that instant could inherit it; Linux has no such window.
    #[cfg(not(target_os = "linux"))]
    fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
        let mut m: libc::c_int = -1;
        let mut s: libc::c_int = -1;
        // SAFETY: openpty writes the two descriptors; null name, termios
        // and winsize are allowed. Both are owned at once.
        unsafe {
            cvt(libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            ))?;
            let (master, slave) = (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s));
            for fd in [m, s] {
                cvt(libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC))?;
            }
            Ok((master, slave))
        }
    }

    fn async_file(fd: OwnedFd) -> io::Result<Arc<AsyncFd<File>>> {
        set_nonblocking(&fd)?;
        // SAFETY: the File owns the descriptor and never swaps it, so it
        // stays open and the same for the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register(File::from(fd)) }?;
        Ok(Arc::new(fd))
    }

    /// Sets up the child's standard streams and returns the parent's ends.
    fn wire(command: &mut tokio::process::Command, pty: Option<(u16, u16)>) -> io::Result<Ends> {
        match pty {
            Some((cols, rows)) => {
                let (master, slave) = open_pty()?;
                set_winsize(master.as_raw_fd(), cols, rows)?;
                command
                    .stdin(Stdio::from(slave.try_clone()?))
                    .stdout(Stdio::from(slave.try_clone()?))
                    .stderr(Stdio::from(slave));
                // SAFETY: setsid and ioctl are async-signal-safe; the hook
                // touches no memory of the parent.
                unsafe {
                    command.pre_exec(|| {
                        // A session of its own (so also a process group the
                        // containment can kill), with the terminal, now on
                        // fd 0, as its controlling terminal: job control and
                        // ^C work as in any login.
                        cvt(libc::setsid())?;
                        cvt(libc::ioctl(0, libc::TIOCSCTTY as _, 0))?;
                        Ok(())
                    });
                }
                let master = async_file(master)?;
                Ok(Ends {
                    output: master.clone(),
                    input: master.clone(),
                    master: Some(master),
                })
            }
            None => {
                let (out_r, out_w) = std::io::pipe()?;
                let (in_r, in_w) = std::io::pipe()?;
                command
                    .stdin(Stdio::from(in_r))
                    .stdout(Stdio::from(out_w.try_clone()?))
                    .stderr(Stdio::from(out_w));
                // SAFETY: setsid is async-signal-safe.
                unsafe {
                    command.pre_exec(|| {
                        // Its own session and process group, as with a
                        // terminal, so both kinds are killed alike.
                        cvt(libc::setsid())?;
                        Ok(())
                    });
                }
                Ok(Ends {
                    output: async_file(OwnedFd::from(out_r))?,
                    input: async_file(OwnedFd::from(in_w))?,
                    master: None,
                })
            }
        }
    }

    /// Reads what is there; `Ok(0)` at the end of output. On Linux a
    /// terminal whose last slave descriptor closed reads `EIO`: the end too.
    async fn read_some(fd: &AsyncFd<File>, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = fd.readable().await?;
            match guard.try_io(|f| f.get_ref().read(buf)) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_some(fd: &AsyncFd<File>, data: &[u8]) -> io::Result<usize> {
        loop {
            let mut guard = fd.writable().await?;
            match guard.try_io(|f| f.get_ref().write(data)) {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// How the session loop ended.
    enum End {
        /// The main process exited and the output drained.
        Exited,
        /// The client went away: nobody to tell anything.
        ClientGone,
        /// The client sent something that is not a frame.
        BadInput(String),
    }

    pub(super) async fn run<B>(b: Arc<Buildlet>, plan: Plan, body: B) -> Response<ResponseBody>
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let contain = b.contain.clone();
        contain.start_reaper();
        let mut jail = contain.prepare();
        let mut command = super::super::exec::contained_command(
            &jail,
            &plan.program,
            &plan.args,
            &plan.env,
            &plan.dir,
        );
        let ends = match wire(&mut command, plan.pty) {
            Ok(e) => e,
            Err(e) => {
                contain.finish(jail);
                return internal("setting up the session's terminal", e);
            }
        };
        let spawned = super::super::exec::spawn_contained(&contain, &mut jail, &mut command);
        // Closes the parent's copies of the slave / the child's pipe ends,
        // so the output ends when the session's processes are gone.
        drop(command);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                contain.finish(jail);
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("cannot start {}: {e}\n", plan.program.display()),
                );
            }
        };
        let pid = jail.pid();
        tracing::info!(pid, program = %plan.program.display(), args = ?plan.args, dir = %plan.dir.display(), pty = ?plan.pty, "shell");

        let (tx, resp_body) = ResponseBody::channel(16);
        tokio::spawn(async move {
            // Boxed errors are Send whatever the transport's are.
            let mut body = body.map_err(Into::<BoxError>::into);
            let mut decoder = FrameDecoder::new();
            // Input taken from a frame, not yet written.
            let mut pending = Bytes::new();
            let mut input = Some(ends.input);
            let mut body_done = false;
            let mut output_done = false;
            let mut exit: Option<io::Result<std::process::ExitStatus>> = None;
            let mut drain_deadline: Option<tokio::time::Instant> = None;
            let mut buf = vec![0u8; READ_CHUNK];
            let end = loop {
                if output_done && exit.is_some() {
                    break End::Exited;
                }
                // Frames already received are applied before more are read,
                // so at most one frame's worth of input is held. Once the
                // main process exited, input is no longer read: nothing
                // the client sends then can change how the session ended.
                let mut bad = None;
                while pending.is_empty() {
                    match decoder.next_frame() {
                        Ok(None) => break,
                        Ok(Some(ShellInput::Data(d))) => {
                            if input.is_some() {
                                pending = d;
                            }
                        }
                        Ok(Some(ShellInput::Resize { cols, rows })) => {
                            if let Some(m) = &ends.master
                                && let Err(e) = set_winsize(m.as_raw_fd(), cols, rows)
                            {
                                tracing::debug!(pid, "resizing the terminal: {e}");
                            }
                        }
                        Ok(Some(ShellInput::Eof)) => input = None,
                        Err(e) => {
                            bad = Some(e.to_string());
                            break;
                        }
                    }
                }
                if let Some(e) = bad {
                    break End::BadInput(e);
                }
                tokio::select! {
                    frame = body.frame(), if pending.is_empty() && !body_done && exit.is_none() => match frame {
                        Some(Ok(f)) => {
                            if let Ok(data) = f.into_data() {
                                decoder.push(&data);
                            }
                        }
                        Some(Err(e)) => {
                            tracing::debug!(pid, "request body broke off: {e}");
                            break End::ClientGone;
                        }
                        // The client finished sending: end of input. A
                        // frame cut in half is garbage, not input.
                        None => {
                            body_done = true;
                            input = None;
                            if decoder.buffered() > 0 {
                                break End::BadInput(format!(
                                    "request body ended inside a frame ({} bytes left over)",
                                    decoder.buffered()
                                ));
                            }
                        }
                    },
                    written = async {
                        match &input {
                            Some(fd) if !pending.is_empty() => write_some(fd, &pending).await,
                            _ => std::future::pending().await,
                        }
                    } => match written {
                        Ok(n) => {
                            bytes::Buf::advance(&mut pending, n);
                        }
                        Err(e) => {
                            // The session stopped reading for good (its
                            // processes are gone): drop what is left.
                            tracing::debug!(pid, "writing input: {e}");
                            pending = Bytes::new();
                            input = None;
                        }
                    },
                    n = read_some(&ends.output, &mut buf), if !output_done => match n {
                        Ok(0) => output_done = true,
                        Ok(n) => {
                            let chunk = Bytes::copy_from_slice(&buf[..n]);
                            if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                                break End::ClientGone;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(pid, "reading the session's output: {e}");
                            output_done = true;
                        }
                    },
                    status = child.wait(), if exit.is_none() => {
                        exit = Some(status);
                        contain.exited(&jail);
                        // What the main process left running dies with it
                        // (and would hold the terminal open otherwise).
                        contain.kill(&jail);
                        pending = Bytes::new();
                        input = None;
                        drain_deadline = Some(tokio::time::Instant::now() + super::super::exec::DRAIN_GRACE);
                    }
                    _ = tx.closed() => break End::ClientGone,
                    _ = async {
                        match drain_deadline {
                            Some(d) => tokio::time::sleep_until(d).await,
                            None => std::future::pending().await,
                        }
                    } => {
                        tracing::warn!(pid, "session output still open after exit; a process escaped containment");
                        output_done = true;
                    }
                }
            };
            contain.kill(&jail);
            let exit = match exit {
                Some(e) => e,
                None => {
                    let _ = child.start_kill();
                    let e = child.wait().await;
                    contain.exited(&jail);
                    e
                }
            };
            contain.finish(jail);
            let state = match end {
                End::ClientGone => {
                    tracing::info!(pid, "shell client went away; session killed");
                    return;
                }
                End::BadInput(e) => {
                    tracing::info!(pid, "bad shell input: {e}; session killed");
                    ProcessState::Error(format!("bad input: {e}"))
                }
                End::Exited => match exit {
                    Ok(s) => super::super::exec::to_state(s),
                    Err(e) => ProcessState::Error(format!("waiting for the shell: {e}")),
                },
            };
            tracing::info!(pid, state = %state, "shell done");
            super::super::exec::send_state(&tx, &state).await;
        });
        super::super::exec::streaming_response(
            resp_body,
            "application/octet-stream",
            "Process-State",
        )
    }
}
