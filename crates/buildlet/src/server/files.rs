//! File endpoints: `/writetgz`, `/write`, `/tgz`, `/ls`, `/removeall`.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame};
use tokio::sync::mpsc;
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::body::BodyFrame;
use super::{Buildlet, Form, ResponseBody, query_pairs, read_form, text};
use crate::beneath::{DirError, Kind};
use crate::paths;
use crate::proto::{EntryKind, LsEntry};
use crate::tarball::{self, LimitedReader, TarError};

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub(super) fn bad(msg: impl std::fmt::Display) -> Response<ResponseBody> {
    text(StatusCode::BAD_REQUEST, format!("{msg}\n"))
}

pub(super) fn too_large(max: u64) -> Response<ResponseBody> {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body is larger than the limit of {max} bytes\n"),
    )
}

/// Resolves a `dir`-style parameter ("" and "." mean the work dir).
fn resolve_param(
    b: &Buildlet,
    p: &str,
    follow_last: bool,
) -> Result<PathBuf, Response<ResponseBody>> {
    let comps = paths::clean(p).map_err(bad)?;
    paths::resolve(&b.root, p, &comps, follow_last).map_err(bad)
}

pub(super) fn content_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Turns a streaming body into a blocking reader for use on a blocking thread.
pub(super) fn blocking_reader<B>(body: B) -> impl Read + Send + 'static
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let stream = body
        .into_data_stream()
        .map_err(|e| io::Error::other(e.into()));
    SyncIoBridge::new(StreamReader::new(stream))
}

async fn extract_response<R: Read + Send + 'static>(
    b: &Buildlet,
    reader: R,
    dir: String,
) -> Response<ResponseBody> {
    let dest = match paths::clean(&dir) {
        Ok(d) => d,
        Err(e) => return bad(e),
    };
    let root = match b.open_root() {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let max = b.cfg.max_body;
    let limits = tarball::Limits {
        max_expanded: b.cfg.max_expanded,
        max_entries: b.cfg.max_entries,
    };
    let result = tokio::task::spawn_blocking(move || {
        tarball::extract_in(LimitedReader::new(reader, max), &root, &dest, limits)
    })
    .await;
    super::release_memory();
    match result {
        Ok(Ok(stats)) => {
            tracing::debug!(?stats, %dir, "extracted tar.gz");
            text(StatusCode::OK, "OK\n")
        }
        Ok(Err(TarError::TooLarge(max))) => too_large(max),
        Ok(Err(e)) if e.is_too_large() => text(StatusCode::PAYLOAD_TOO_LARGE, format!("{e}\n")),
        Ok(Err(e)) if e.is_client_error() => bad(e),
        Ok(Err(e)) if e.is_disk_full() => text(StatusCode::INSUFFICIENT_STORAGE, format!("{e}\n")),
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("extraction task failed: {e}\n"),
        ),
    }
}

/// `PUT /writetgz?dir=`: extract the tar.gz request body.
pub(super) async fn write_tgz_body<B>(b: &Buildlet, req: Request<B>) -> Response<ResponseBody>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let form = Form(query_pairs(&req));
    let dir = form.get("dir").unwrap_or("").to_string();
    if content_length(&req).is_some_and(|n| n > b.cfg.max_body) {
        return too_large(b.cfg.max_body);
    }
    extract_response(b, blocking_reader(req.into_body()), dir).await
}

fn http_client() -> &'static hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<Bytes>,
> {
    static CLIENT: OnceLock<
        hyper_util::client::legacy::Client<
            hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
            http_body_util::Empty<Bytes>,
        >,
    > = OnceLock::new();
    CLIENT.get_or_init(|| {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https)
    })
}

/// `POST /writetgz?dir=` with form field `url`: fetch the tar.gz and extract it.
pub(super) async fn write_tgz_url<B>(b: &Buildlet, req: Request<B>) -> Response<ResponseBody>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let form = match read_form(req).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let dir = form.get("dir").unwrap_or("").to_string();
    let Some(url) = form.get("url") else {
        return bad("POST /writetgz needs a url form field (or PUT the tar.gz as the body)");
    };
    let uri: http::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => return bad(format!("url {url:?}: {e}")),
    };
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return bad(format!("url {url:?}: only http and https are supported"));
    }
    let resp = match tokio::time::timeout(
        std::time::Duration::from_secs(60),
        http_client().get(uri),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return text(StatusCode::BAD_GATEWAY, format!("fetching {url}: {e}\n")),
        Err(_) => {
            return text(
                StatusCode::GATEWAY_TIMEOUT,
                format!("fetching {url}: no answer within 60s\n"),
            );
        }
    };
    if resp.status() != StatusCode::OK {
        return text(
            StatusCode::BAD_GATEWAY,
            format!("fetching {url}: server answered {}\n", resp.status()),
        );
    }
    if resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > b.cfg.max_body)
    {
        return too_large(b.cfg.max_body);
    }
    extract_response(b, blocking_reader(resp.into_body()), dir).await
}

/// Parses an octal permission string such as `0755` or `644`.
fn parse_mode(s: &str) -> Option<u32> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8).ok()?;
    (m <= 0o777).then_some(m)
}

/// `PUT /write?path=&mode=`: write the body to one file, atomically.
pub(super) async fn write_file<B>(b: &Buildlet, req: Request<B>) -> Response<ResponseBody>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let form = Form(query_pairs(&req));
    let Some(path) = form.get("path").map(str::to_string) else {
        return bad("PUT /write needs a path query parameter");
    };
    let mode = match form.get("mode") {
        None | Some("") => 0o644,
        Some(m) => match parse_mode(m) {
            Some(m) => m,
            None => {
                return bad(format!(
                    "mode {m:?} is not an octal permission between 0000 and 0777 (e.g. 0755)"
                ));
            }
        },
    };
    if content_length(&req).is_some_and(|n| n > b.cfg.max_body) {
        return too_large(b.cfg.max_body);
    }
    let comps = match paths::clean(&path) {
        Ok(c) if c.is_empty() => return bad("path must name a file, not the work dir"),
        Ok(c) => c,
        Err(e) => return bad(e),
    };
    let root = match b.open_root() {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let (last, parent_comps) = comps.split_last().expect("comps is not empty");
    // The parent is opened (and created) below the root by handle; the
    // file is created, filled and renamed relative to that handle.
    let parent = match root.dir(&path, parent_comps, Some(&mut Vec::new())) {
        Ok(p) => p,
        Err(DirError::Path(e)) => return bad(e),
        Err(DirError::Io(e)) => {
            return super::io_error(format_args!("path {path:?}: creating parent directory"), &e);
        }
    };
    match parent.lstat(last) {
        Ok(Some(st)) if st.kind == Kind::Dir => {
            return bad(format!("path {path:?}: a directory exists at this path"));
        }
        Ok(_) => {}
        Err(e) => return super::io_error(format_args!("path {path:?}"), &e),
    }
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = format!(
        ".farmer-write-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let file = match parent.create_new(&tmp, 0o600) {
        Ok(f) => f,
        Err(e) => return super::io_error(format_args!("writing {path:?}"), &e),
    };
    let result = write_body(req.into_body(), file, mode, b.cfg.max_body).await;
    let finish = result.and_then(|()| parent.rename(&tmp, last).map_err(WriteError::Io));
    match finish {
        Ok(()) => text(StatusCode::OK, "OK\n"),
        Err(e) => {
            let _ = parent.unlink(&tmp);
            match e {
                WriteError::TooLarge => too_large(b.cfg.max_body),
                WriteError::Body(e) => bad(format!("reading request body: {e}")),
                WriteError::Io(e) => super::io_error(format_args!("writing {path:?}"), &e),
            }
        }
    }
}

enum WriteError {
    TooLarge,
    Body(BoxError),
    Io(io::Error),
}

async fn write_body<B>(mut body: B, file: fs::File, mode: u32, max: u64) -> Result<(), WriteError>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    use tokio::io::AsyncWriteExt;
    set_mode(&file, mode)?;
    let mut f = tokio::fs::File::from_std(file);
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| WriteError::Body(e.into()))?;
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            if total > max {
                return Err(WriteError::TooLarge);
            }
            f.write_all(&data).await.map_err(WriteError::Io)?;
        }
    }
    f.flush().await.map_err(WriteError::Io)
}

#[cfg(unix)]
fn set_mode(f: &fs::File, mode: u32) -> Result<(), WriteError> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(WriteError::Io)
}

#[cfg(not(unix))]
fn set_mode(_f: &fs::File, _mode: u32) -> Result<(), WriteError> {
    Ok(())
}

/// Buffers writes into frames for a streaming body, from a blocking thread.
struct ChannelWriter {
    tx: mpsc::Sender<BodyFrame>,
    buf: BytesMut,
}

const CHUNK: usize = 128 * 1024;

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.tx
            .blocking_send(Ok(Frame::data(chunk)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))
    }
}

/// `GET /tgz?dir=&level=`: stream a tar.gz of a directory.
pub(super) async fn get_tgz<B>(b: &Buildlet, req: Request<B>) -> Response<ResponseBody> {
    let form = Form(query_pairs(&req));
    let dir = form.get("dir").unwrap_or("");
    let level = match form.get("level").map(str::parse::<u32>) {
        None => 1,
        Some(Ok(l)) if l <= 9 => l,
        Some(_) => return bad("level must be a gzip level from 0 to 9"),
    };
    let path = match resolve_param(b, dir, true) {
        Ok(p) => p,
        Err(r) => return r,
    };
    // A regular file gives a one-entry archive (gomote get).
    let single = match fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => false,
        Ok(m) if m.is_file() => true,
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                format!("dir {dir:?}: no such directory or file\n"),
            );
        }
    };
    let (tx, body) = ResponseBody::channel(8);
    tokio::task::spawn_blocking(move || {
        let w = ChannelWriter {
            tx: tx.clone(),
            buf: BytesMut::with_capacity(CHUNK),
        };
        let packed = if single {
            tarball::pack_file(&path, w, level)
        } else {
            tarball::pack(&path, w, level)
        }
        .and_then(|mut w| w.flush());
        super::release_memory();
        match packed {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
            Err(e) => {
                tracing::warn!("tgz of {}: {e}", path.display());
                let _ = tx.blocking_send(Err(e));
            }
        }
    });
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/gzip"),
    );
    resp
}

/// `GET /ls?dir=&recursive=&digest=&skip=`: JSON lines, one entry each.
pub(super) async fn ls<B>(b: &Buildlet, req: Request<B>) -> Response<ResponseBody> {
    let form = Form(query_pairs(&req));
    let dir = form.get("dir").unwrap_or("").to_string();
    let recursive = form.flag("recursive");
    let digest = form.flag("digest");
    let mut skip = Vec::new();
    for s in form.all("skip") {
        match paths::clean(s) {
            Ok(c) if !c.is_empty() => skip.push(c.iter().collect::<PathBuf>()),
            Ok(_) => {}
            Err(e) => return bad(format!("skip: {e}")),
        }
    }
    let path = match resolve_param(b, &dir, true) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if !fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
        return text(
            StatusCode::NOT_FOUND,
            format!("dir {dir:?}: no such directory\n"),
        );
    }
    let listing = tokio::task::spawn_blocking(move || list(&path, recursive, digest, &skip)).await;
    match listing {
        Ok(Ok(out)) => {
            let mut resp = Response::new(ResponseBody::full(Bytes::from(out)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/x-ndjson"),
            );
            resp
        }
        Ok(Err(e)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("listing {dir:?}: {e}\n"),
        ),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("listing task failed: {e}\n"),
        ),
    }
}

fn list(dir: &Path, recursive: bool, digest: bool, skip: &[PathBuf]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut emit = |full: &Path, rel: &Path, meta: &fs::Metadata| -> io::Result<()> {
        let entry = ls_entry(full, rel, meta, digest)?;
        serde_json::to_writer(&mut out, &entry)?;
        out.push(b'\n');
        Ok(())
    };
    if recursive {
        tarball::walk(dir, Path::new(""), skip, &mut emit)?;
    } else {
        let mut names: Vec<_> = fs::read_dir(dir)?.collect::<io::Result<Vec<_>>>()?;
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let rel = PathBuf::from(e.file_name());
            if skip.contains(&rel) {
                continue;
            }
            let meta = fs::symlink_metadata(e.path())?;
            emit(&e.path(), &rel, &meta)?;
        }
    }
    Ok(out)
}

fn ls_entry(full: &Path, rel: &Path, meta: &fs::Metadata, digest: bool) -> io::Result<LsEntry> {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        EntryKind::File
    } else {
        EntryKind::Other
    };
    let mut path = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/");
    if kind == EntryKind::Dir {
        path.push('/');
    }
    let sha256 = if digest && kind == EntryKind::File {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        io::copy(&mut fs::File::open(full)?, &mut h)?;
        Some(hex::encode(h.finalize()))
    } else {
        None
    };
    let link = if kind == EntryKind::Symlink {
        Some(fs::read_link(full)?.to_string_lossy().into_owned())
    } else {
        None
    };
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64);
    Ok(LsEntry {
        path,
        mode: file_mode(meta),
        kind,
        size: meta.len(),
        mtime,
        sha256,
        link,
    })
}

#[cfg(unix)]
fn file_mode(meta: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

#[cfg(not(unix))]
fn file_mode(_meta: &fs::Metadata) -> u32 {
    0
}

/// `POST /removeall` with repeated `path` fields; `.` empties the work dir.
pub(super) async fn remove_all<B>(b: &Buildlet, req: Request<B>) -> Response<ResponseBody>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let form = match read_form(req).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let raw: Vec<String> = form.all("path").into_iter().map(str::to_string).collect();
    // `srccache=1`: the source cache goes too (a machine changing hands:
    // the last build's source is not the next holder's to read).
    let clear_cache = form.flag("srccache");
    if raw.is_empty() {
        return bad("POST /removeall needs at least one path field ('.' empties the work dir)");
    }
    // Validate everything first, so a bad path changes nothing.
    let mut targets = Vec::new();
    for p in &raw {
        let comps = match paths::clean(p) {
            Ok(c) => c,
            Err(e) => return bad(e),
        };
        if !comps.is_empty()
            && let Err(e) = paths::resolve(&b.root, p, &comps, false)
        {
            return bad(e);
        }
        targets.push((p.clone(), comps));
    }
    let root = match b.open_root() {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    // A source tree lent to the work dir goes back to the source cache
    // rather than being deleted (see `SrcCache::reclaim`).
    let cache = b.src_cache.clone();
    let cache_dir = b.cfg.src_cache.clone();
    // Removal goes through handles: the parent is opened below the root and
    // the entry removed relative to it, never following a symlink.
    let result = tokio::task::spawn_blocking(move || -> Result<(), Response<ResponseBody>> {
        if clear_cache {
            super::clear_src_cache(&cache, cache_dir.as_deref())
                .map_err(|e| super::io_error("emptying the source cache", &e))?;
        }
        reclaim_below(&cache, cache_dir.as_deref(), &root, &targets);
        remove_targets(&root, targets)
    })
    .await;
    match result {
        Ok(Ok(())) => text(StatusCode::OK, "OK\n"),
        Ok(Err(resp)) => resp,
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("remove task failed: {e}\n"),
        ),
    }
}

/// Gives a source tree lent at or below one of `targets` back to the
/// cache (see `SrcCache::reclaim`) before they are removed.
fn reclaim_below(
    cache: &std::sync::Mutex<crate::srccache::SrcCache>,
    cache_dir: Option<&std::path::Path>,
    root: &crate::beneath::Root,
    targets: &[(String, Vec<String>)],
) {
    if let Some(cache_dir) = cache_dir {
        let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
        if targets.iter().any(|(_, comps)| c.lent_below(comps)) {
            c.reclaim(root, cache_dir);
        }
    }
}

/// Empties the work dir as `/removeall path=.` does (a lent source tree
/// goes back to the cache): `/exec`'s `clean=1`, after its command. Runs
/// blocking; the error says what failed.
pub(super) fn clean_work_dir(b: &Buildlet) -> Result<(), String> {
    let root = b
        .reopen_root()
        .map_err(|e| format!("opening the work dir {}: {e}", b.root.display()))?;
    let whole = [(".".to_string(), Vec::new())];
    reclaim_below(&b.src_cache, b.cfg.src_cache.as_deref(), &root, &whole);
    empty_work_dir(root.as_dir()).map_err(|e| format!("emptying the work dir: {e}"))
}

/// Empties the work dir, leaving its `tmp` directory there, empty: our
/// own plain directory is emptied and kept rather than removed and made
/// anew (see `srccache::fs_now` for what a freed inode per build costs);
/// anything else by that name (a link, a file, a directory a step made
/// that we cannot give back its mode) goes like the rest.
fn empty_work_dir(dir: &crate::beneath::Dir) -> io::Result<()> {
    for name in dir.names_os()? {
        // Only where directories are opened by handle (never through a
        // link swapped in after the check); elsewhere it goes and is made
        // again.
        if cfg!(unix)
            && name == "tmp"
            && dir
                .lstat_os(&name)?
                .is_some_and(|st| st.kind == crate::beneath::Kind::Dir)
            && dir
                .open_dir_restored(&name)
                .and_then(|tmp| tmp.empty())
                .is_ok()
        {
            continue;
        }
        dir.remove_all_os(&name)?;
    }
    match dir.mkdir("tmp") {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Removes each target below `root` (`.`, no components, empties it).
fn remove_targets(
    root: &crate::beneath::Root,
    targets: Vec<(String, Vec<String>)>,
) -> Result<(), Response<ResponseBody>> {
    for (p, comps) in targets {
        let ioe = |e: &io::Error| super::io_error(format_args!("removing {p:?}"), e);
        match comps.split_last() {
            None => empty_work_dir(root.as_dir()).map_err(|e| ioe(&e))?,
            Some((last, parent)) => match root.dir(&p, parent, None) {
                Ok(dir) => dir.remove_all(last).map_err(|e| ioe(&e))?,
                Err(DirError::Path(e)) => return Err(bad(e)),
                // Nothing there to remove.
                Err(DirError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) => {}
                Err(DirError::Io(e)) => return Err(ioe(&e)),
            },
        }
    }
    Ok(())
}
