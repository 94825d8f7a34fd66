//! Artifacts in an S3-compatible object store (AWS S3, MinIO, Ceph, R2…),
//! through the `object_store` crate: signing, retries and streaming are
//! its job, not ours.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};

use super::{ArtifactStore, BoxFuture, Object, check_key};

/// `[storage]`: where artifacts live when not in the data dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// `s3://BUCKET[/PREFIX]`.
    pub url: String,
    /// The service's address for anything but AWS (`http://` only for a
    /// server on this machine or a trusted network).
    pub endpoint: Option<String>,
    /// Default: `AWS_DEFAULT_REGION` / `AWS_REGION`, else us-east-1.
    pub region: Option<String>,
}

impl StorageConfig {
    /// The bucket and the key prefix of `url`.
    pub fn bucket_prefix(&self) -> Result<(String, String), String> {
        let rest = self.url.strip_prefix("s3://").ok_or_else(|| {
            format!(
                "[storage] url {:?} is not s3://BUCKET/PREFIX (leave [storage] out to keep artifacts in the data dir)",
                self.url
            )
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
        if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(ok) {
            return Err(format!(
                "[storage] url {:?}: {bucket:?} is not a bucket name (3-63 of a-z, 0-9, '-', '.')",
                self.url
            ));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if !prefix.is_empty() {
            check_key(&prefix).map_err(|_| {
                format!(
                    "[storage] url {:?}: the prefix {prefix:?} must be /-separated names of a-z, 0-9, '.', '_', '-'",
                    self.url
                )
            })?;
        }
        Ok((bucket.to_string(), prefix))
    }
}

/// An S3 bucket (under a prefix) as the artifact store.
pub struct S3 {
    store: Arc<dyn ObjectStore>,
    /// The same bucket for streamed GETs, without a whole-request timeout.
    reader: Arc<dyn ObjectStore>,
    describe: String,
}

impl S3 {
    /// Credentials come from the usual AWS variables (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) or the instance's role.
    pub fn new(cfg: &StorageConfig) -> anyhow::Result<S3> {
        let (bucket, prefix) = cfg.bucket_prefix().map_err(anyhow::Error::msg)?;
        let http = cfg
            .endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        let build = |client: ClientOptions| -> anyhow::Result<Arc<dyn ObjectStore>> {
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(&bucket)
                .with_retry(RetryConfig {
                    max_retries: 3,
                    retry_timeout: Duration::from_secs(30),
                    ..Default::default()
                })
                .with_client_options(client.with_connect_timeout(Duration::from_secs(5)))
                // After the client options, which hold it: only an http://
                // endpoint named in the config allows plain HTTP (never
                // AWS_ALLOW_HTTP from the environment).
                .with_allow_http(http);
            if let Some(r) = &cfg.region {
                b = b.with_region(r);
            } else if std::env::var_os("AWS_DEFAULT_REGION").is_none()
                && std::env::var_os("AWS_REGION").is_none()
            {
                b = b.with_region("us-east-1");
            }
            if let Some(e) = &cfg.endpoint {
                b = b.with_endpoint(e.trim_end_matches('/'));
            }
            let s3 = b
                .build()
                .map_err(|e| anyhow::anyhow!("[storage] {}: {e}", cfg.url))?;
            Ok(if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(PrefixStore::new(s3, prefix.as_str()))
            })
        };
        // Writes, HEADs and listings are bounded as a whole (a store that
        // stops answering fails a write within a few minutes, and a log then
        // stays in the database); reads stream to clients as slow as they
        // are, so only their connecting is bounded.
        let store = build(ClientOptions::new().with_timeout(Duration::from_secs(120)))?;
        let reader = build(ClientOptions::new().with_timeout_disabled())?;
        let at = cfg
            .endpoint
            .as_deref()
            .map_or(String::new(), |e| format!(" at {e}"));
        Ok(S3 {
            store,
            reader,
            describe: format!(
                "S3 bucket {bucket}{}{at}",
                if prefix.is_empty() {
                    String::new()
                } else {
                    format!(" under {prefix}/")
                }
            ),
        })
    }

    fn path(key: &str) -> io::Result<ObjectPath> {
        check_key(key)?;
        ObjectPath::parse(key).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }
}

/// `object_store`'s errors as I/O errors, "not found" kept apart.
fn io_err(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, e),
        e => io::Error::other(e),
    }
}

fn found<T>(r: Result<T, object_store::Error>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(io_err(e)),
    }
}

impl ArtifactStore for S3 {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<Option<Bytes>>> {
        Box::pin(async move {
            let p = S3::path(key)?;
            // A whole (small) object: bounded like a write.
            let Some(r) = found(self.store.get(&p).await)? else {
                return Ok(None);
            };
            Ok(Some(r.bytes().await.map_err(io_err)?))
        })
    }

    fn open<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<Option<Object>>> {
        Box::pin(async move {
            let p = S3::path(key)?;
            let Some(r) = found(self.reader.get(&p).await)? else {
                return Ok(None);
            };
            let size = r.meta.size;
            let body = r.into_stream().map(|c| c.map_err(io_err));
            Ok(Some(Object {
                size,
                body: Box::pin(body),
            }))
        })
    }

    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let p = S3::path(key)?;
            // One PUT: readers see the old object or the new one.
            self.store
                .put(&p, PutPayload::from(data))
                .await
                .map_err(io_err)?;
            Ok(())
        })
    }

    fn check(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            // A listing answers "no such bucket" and "access denied"; a
            // HEAD of a missing key cannot tell them from "not found".
            self.store
                .list_with_delimiter(None)
                .await
                .map(|_| ())
                .map_err(|e| io::Error::other(e.to_string()))
        })
    }

    fn version<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<Option<String>>> {
        Box::pin(async move {
            let p = S3::path(key)?;
            Ok(found(self.store.head(&p).await)?.map(|m| {
                m.e_tag
                    .unwrap_or_else(|| format!("{}-{}", m.last_modified.timestamp_millis(), m.size))
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> StorageConfig {
        StorageConfig {
            url: url.into(),
            endpoint: None,
            region: None,
        }
    }

    #[test]
    fn urls_name_a_bucket_and_a_prefix() {
        assert_eq!(
            cfg("s3://farm-logs/prod/eu").bucket_prefix().unwrap(),
            ("farm-logs".into(), "prod/eu".into())
        );
        assert_eq!(
            cfg("s3://farm-logs").bucket_prefix().unwrap(),
            ("farm-logs".into(), String::new())
        );
        for bad in [
            "gs://x/y",
            "s3://UPPER/x",
            "s3://ab",
            "s3://farm/../x",
            "s3://farm/A b",
        ] {
            assert!(cfg(bad).bucket_prefix().is_err(), "{bad}");
        }
    }
}
