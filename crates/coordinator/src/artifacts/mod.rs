//! The artifact store: named blobs the coordinator keeps and serves —
//! published buildlet binaries and their release index (see
//! [`crate::release`]), finished logs (see [`crate::store`]) and the files
//! builds keep (`artifacts = [...]` of a step, see [`crate::builds`]).
//!
//! [`ArtifactStore`] has two backends: [`LocalDir`], a directory under the
//! data dir (the default), and [`S3`], any S3-compatible object store
//! through the `object_store` crate (`[storage] url = "s3://bucket/prefix"`),
//! which a standby coordinator can share. Both do the same five calls:
//! whole-object get, streaming open, atomic put, and a cheap change token
//! (mtime and size here, the ETag there) that the coordinator polls to
//! notice a publish.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;

mod local;
mod s3;

pub use local::LocalDir;
pub use s3::{S3, StorageConfig};

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
    /// Checks that the store can be used (a bucket exists and these
    /// credentials may list it), so a mistake shows at start.
    fn check(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
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

/// The farm's artifact store: S3 when `[storage]` names a bucket, else the
/// directory `dir` (in the data dir).
pub fn open(cfg: Option<&StorageConfig>, dir: &Path) -> anyhow::Result<Arc<dyn ArtifactStore>> {
    match cfg {
        Some(c) => Ok(Arc::new(S3::new(c)?)),
        None => Ok(Arc::new(LocalDir::new(dir))),
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
