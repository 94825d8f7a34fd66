//! Artifacts as files under a directory: the default store.

use std::io;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;

use super::{ArtifactStore, BoxFuture, Object, check_key};

/// Artifacts as files under a directory.
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    pub fn new(root: impl Into<PathBuf>) -> LocalDir {
        LocalDir { root: root.into() }
    }

    /// The file that holds `key`.
    pub fn path(&self, key: &str) -> io::Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

fn missing<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn put_file(path: &Path, data: &[u8]) -> io::Result<()> {
    atomicfile::write(path, data, None)
}

impl ArtifactStore for LocalDir {
    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<Option<Bytes>>> {
        Box::pin(async move {
            let p = self.path(key)?;
            Ok(missing(tokio::fs::read(&p).await)?.map(Bytes::from))
        })
    }

    fn open<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<Option<Object>>> {
        Box::pin(async move {
            let p = self.path(key)?;
            let Some(file) = missing(tokio::fs::File::open(&p).await)? else {
                return Ok(None);
            };
            let size = file.metadata().await?.len();
            let body = futures_util::stream::unfold(Some(file), |file| async move {
                let mut file = file?;
                let mut buf = BytesMut::with_capacity(256 * 1024);
                match file.read_buf(&mut buf).await {
                    Ok(0) => None,
                    Ok(_) => Some((Ok(buf.freeze()), Some(file))),
                    Err(e) => Some((Err(e), None)),
                }
            });
            Ok(Some(Object {
                size,
                body: Box::pin(body),
            }))
        })
    }

    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let p = self.path(key)?;
            tokio::task::spawn_blocking(move || put_file(&p, &data))
                .await
                .map_err(io::Error::other)?
        })
    }

    fn version<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<Option<String>>> {
        Box::pin(async move {
            let p = self.path(key)?;
            let Some(m) = missing(tokio::fs::metadata(&p).await)? else {
                return Ok(None);
            };
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            Ok(Some(format!("{mtime}-{}", m.len())))
        })
    }
}
