//! The artifact store: named blobs the coordinator serves, starting with
//! published buildlet binaries and their release index (see
//! [`crate::release`]).
//!
//! [`ArtifactStore`] is the seam for scale: the embedded default is
//! [`LocalDir`], a directory under the data dir; an S3-compatible object
//! store (`object_store`) implements the same five calls — whole-object
//! get, streaming open, atomic put, and a cheap change token (mtime and size
//! here, the ETag there) that the coordinator polls to notice a publish.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::io::AsyncReadExt;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// An object opened for streaming.
pub struct Object {
    pub size: u64,
    pub body: ByteStream,
}

/// Where artifacts live. Keys are relative `/`-separated names of
/// `[a-z0-9._-]` segments (checked by [`check_key`]).
pub trait ArtifactStore: Send + Sync + 'static {
    /// Where it is, for log lines and errors.
    fn describe(&self) -> String;
    /// A whole (small) object, or `None` if missing.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<Option<Bytes>>>;
    /// An object as a stream with its size, or `None` if missing.
    fn open<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<Option<Object>>>;
    /// Creates or replaces an object atomically: readers see the old or the
    /// new content, never a part.
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, io::Result<()>>;
    /// A token that changes whenever the object changes, or `None` if missing.
    fn version<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<Option<String>>>;
}

/// Refuses keys that could escape the store or are not plain names.
pub fn check_key(key: &str) -> io::Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 512
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
        });
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid artifact key {key:?}"),
        ))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[test]
    fn keys() {
        assert!(check_key("stage0/index.json").is_ok());
        assert!(check_key("stage0/blobs/abc123").is_ok());
        for bad in ["", "/abs", "a/../b", "a//b", "A", "a/./b", "a\\b", "a/"] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn local_dir_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalDir::new(dir.path());
        assert!(s.get("x/y").await.unwrap().is_none());
        assert!(s.version("x/y").await.unwrap().is_none());
        s.put("x/y", Bytes::from_static(b"one")).await.unwrap();
        let v1 = s.version("x/y").await.unwrap().unwrap();
        assert_eq!(s.get("x/y").await.unwrap().unwrap(), "one");
        std::thread::sleep(std::time::Duration::from_millis(10));
        s.put("x/y", Bytes::from(vec![7u8; 600_000])).await.unwrap();
        assert_ne!(s.version("x/y").await.unwrap().unwrap(), v1);
        let o = s.open("x/y").await.unwrap().unwrap();
        assert_eq!(o.size, 600_000);
        let chunks: Vec<_> = o.body.collect().await;
        let total: usize = chunks.iter().map(|c| c.as_ref().unwrap().len()).sum();
        assert_eq!(total, 600_000);
        assert!(s.put("../z", Bytes::new()).await.is_err());
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("x"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("y")]);
    }
}
