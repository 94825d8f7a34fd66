//! Reading the watched repositories with gix (a git library): branch heads,
//! new commits, commit metadata, and a commit's tree as a tar.gz for the
//! buildlets (which need no git).
//!
//! A [`Repo`] is either a local repository opened in place (a path, bare or
//! with a work tree) or a bare clone of a remote URL kept under a cache
//! directory and updated by [`Repo::fetch`]. [`write_history`] creates a
//! repository from scratch (the demo's sample repository), also without git.

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use gix::bstr::{BStr, ByteSlice};

mod https;
use gix::objs::FindExt;
use gix::objs::tree::EntryKind;
pub use https::HttpsAuth;

/// One commit, as the poller records it and the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Commit {
    /// Full hex hash.
    pub hash: String,
    /// Full hex hashes of the parents, in order.
    pub parents: Vec<String>,
    /// Author name.
    pub author: String,
    /// Author email.
    pub email: String,
    /// Author time, unix seconds.
    pub time: i64,
    /// The subject: the message's first paragraph folded into one line, as
    /// `git log --format=%s` shows it (usually just the first line).
    pub subject: String,
}

/// Everything that can go wrong reading a repository. Every message names the
/// repository (path or URL, with any password removed) and what failed.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The repository could not be opened (missing path, not a repository…).
    #[error("cannot open git repository {repo}: {detail}")]
    Open { repo: String, detail: String },
    /// The URL's transport is not available in this build.
    #[error("git repository {url}: {reason}")]
    Unsupported { url: String, reason: String },
    /// Cloning a remote repository into the cache failed.
    #[error("cannot clone {url} into {path}: {detail}")]
    Clone {
        url: String,
        path: String,
        detail: String,
    },
    /// Fetching from the remote failed.
    #[error("cannot fetch {url} into {path}: {detail}")]
    Fetch {
        url: String,
        path: String,
        detail: String,
    },
    /// A branch or commit that does not exist.
    #[error("git repository {repo}: {what} not found")]
    NotFound { repo: String, what: String },
    /// A malformed argument: a branch name git does not allow, a revision
    /// that is not a commit…
    #[error("git repository {repo}: invalid {what}: {detail}")]
    Invalid {
        repo: String,
        what: String,
        detail: String,
    },
    /// Reading refs or objects failed (a corrupt or unreadable repository).
    #[error("git repository {repo}: reading {what}: {detail}")]
    Read {
        repo: String,
        what: String,
        detail: String,
    },
    /// Producing the tar.gz failed: a tree entry that can't be archived
    /// safely, or the output writer failed.
    #[error("git repository {repo}: archiving commit {commit}: {detail}")]
    Archive {
        repo: String,
        commit: String,
        detail: String,
    },
    /// Creating a repository or writing objects and refs failed.
    #[error("git repository {repo}: writing {what}: {detail}")]
    Write {
        repo: String,
        what: String,
        detail: String,
    },
}

/// A watched repository. Cheap to share: `Send + Sync`, every method takes
/// `&self` and works on its own thread-local handle.
pub struct Repo {
    repo: gix::ThreadSafeRepository,
    /// How errors name this repository: the path, or the URL without password.
    name: String,
    /// For clones, the remote's URL (fetch updates from it).
    remote: Option<String>,
    /// For `https://` clones, fetched with the system's git: the
    /// credentials and trust to use.
    https: Option<HttpsAuth>,
    /// One fetch at a time per repository.
    fetch_lock: Mutex<()>,
    /// Commits looked up by full hash: an object never changes, and every
    /// triggered build looks its commit up (opening a thread-local handle
    /// and inflating the object cost ~8 % of the coordinator's CPU per
    /// build in the throughput bench).
    commits: Mutex<CommitCache>,
}

/// The last [`CommitCache::CAP`] commits looked up by full hash.
#[derive(Default)]
struct CommitCache {
    by_hash: std::collections::HashMap<String, Commit>,
    order: std::collections::VecDeque<String>,
}

impl CommitCache {
    const CAP: usize = 256;

    fn get(&self, hash: &str) -> Option<Commit> {
        self.by_hash.get(hash).cloned()
    }

    fn put(&mut self, c: &Commit) {
        if self.by_hash.contains_key(&c.hash) {
            return;
        }
        if self.order.len() >= Self::CAP
            && let Some(old) = self.order.pop_front()
        {
            self.by_hash.remove(&old);
        }
        self.order.push_back(c.hash.clone());
        self.by_hash.insert(c.hash.clone(), c.clone());
    }
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo")
            .field("name", &self.name)
            .field("git_dir", &self.repo.git_dir())
            .field("cloned", &self.remote.is_some())
            .finish()
    }
}

/// Where a repository comes from.
enum Location {
    Local(PathBuf),
    Remote,
    /// `http(s)://`: through the system's git.
    Https,
}

/// The remote name clones are made with.
const REMOTE_NAME: &str = "origin";

/// Clones mirror the remote's branches as their own `refs/heads/*`,
/// force-updated (a branch force-pushed upstream is followed).
const MIRROR_REFSPEC: &str = "+refs/heads/*:refs/heads/*";

/// gzip level for source archives. Measured on ~2000 real source files
/// (16 MB): level 3 compresses at ~120 MB/s to 4.0 MB, level 6 (the
/// default) at ~65 MB/s to 3.7 MB, level 1 at ~190 MB/s to 5.6 MB. The
/// archive is made once per commit, while every builder of that commit
/// waits, then cached and sent to each of them: 3 balances the two.
const GZIP_LEVEL: u32 = 3;

/// Nesting deeper than this is refused when archiving (git itself refuses
/// 4096 levels; real trees are a few dozen deep).
const MAX_TREE_DEPTH: usize = 1024;

impl Repo {
    /// Opens a repository. `url` is a local path to a repository (bare or with
    /// a work tree), opened in place, or a URL: `file://`, `ssh://`, `git://`
    /// or scp-like `user@host:path`. URLs are cloned bare (all branches, as
    /// `refs/heads/*`) into a directory under `cache_dir` named after the URL
    /// on first use, and reopened from there afterwards; [`Repo::fetch`]
    /// updates them. `http(s)://` URLs are cloned and fetched with the
    /// system's git (see [`Repo::open_with`] for credentials).
    ///
    /// `file://` URLs are cloned like any remote (gix runs `git-upload-pack`
    /// for them, so that one case needs git installed); plain paths need no git.
    pub fn open(url: &str, cache_dir: &Path) -> Result<Repo, GitError> {
        Repo::open_with(url, cache_dir, &HttpsAuth::default())
    }

    /// [`Repo::open`], with the credentials and trust an `https://` remote
    /// needs (ignored for other URLs).
    pub fn open_with(url: &str, cache_dir: &Path, auth: &HttpsAuth) -> Result<Repo, GitError> {
        match classify(url)? {
            Location::Local(path) => {
                let name = path.display().to_string();
                let repo = gix::open(&path).map_err(|e| GitError::Open {
                    repo: name.clone(),
                    detail: if path.exists() {
                        chain(&e)
                    } else {
                        "no such file or directory".into()
                    },
                })?;
                Ok(Repo {
                    repo: repo.into_sync(),
                    name,
                    remote: None,
                    https: None,
                    fetch_lock: Mutex::new(()),
                    commits: Mutex::default(),
                })
            }
            Location::Remote => open_clone(url, cache_dir, None),
            Location::Https => open_clone(url, cache_dir, Some(auth)),
        }
    }

    /// The path of the repository's git directory (for clones, inside the cache).
    pub fn git_dir(&self) -> &Path {
        self.repo.git_dir()
    }

    /// Whether this is a clone of a remote URL (that [`Repo::fetch`] updates).
    pub fn is_clone(&self) -> bool {
        self.remote.is_some()
    }

    /// Updates all branches from the remote for cloned repositories
    /// (branches force-pushed upstream are followed); a no-op for local paths.
    pub fn fetch(&self) -> Result<(), GitError> {
        self.fetch_refspecs(&[])
    }

    /// Fetches `remote_ref` (e.g. a pull request's `refs/pull/7/head`)
    /// into `local_ref` and returns the commit it names. For a local
    /// repository, reads `remote_ref` in place.
    pub fn fetch_ref(&self, remote_ref: &str, local_ref: &str) -> Result<String, GitError> {
        let valid = |r: &str| {
            r.starts_with("refs/")
                && gix::refs::FullName::try_from(r).is_ok()
                && !r.contains("..")
                && r.bytes().all(|b| b.is_ascii_graphic())
        };
        for r in [remote_ref, local_ref] {
            if !valid(r) {
                return Err(GitError::Invalid {
                    repo: self.name.clone(),
                    what: format!("ref {r:?}"),
                    detail: "not a full ref name under refs/".into(),
                });
            }
        }
        let read = if self.remote.is_some() {
            self.fetch_refspecs(&[&format!("+{remote_ref}:{local_ref}")])?;
            local_ref
        } else {
            remote_ref
        };
        let repo = self.repo.to_thread_local();
        let id = self.resolve_commit(&repo, read)?;
        Ok(id.to_string())
    }

    fn fetch_refspecs(&self, extra: &[&str]) -> Result<(), GitError> {
        let Some(url) = &self.remote else {
            return Ok(());
        };
        let _guard = self.fetch_lock.lock().unwrap_or_else(|e| e.into_inner());
        let repo = self.repo.to_thread_local();
        if let Some(auth) = &self.https {
            return https::fetch(repo.git_dir(), extra, auth).map_err(|detail| GitError::Fetch {
                url: self.name.clone(),
                path: repo.git_dir().display().to_string(),
                detail,
            });
        }
        let err = |e: gix::Error| GitError::Fetch {
            url: url.clone(),
            path: repo.git_dir().display().to_string(),
            detail: chain(&e),
        };
        let mut remote = repo.find_remote(REMOTE_NAME).map_err(err)?;
        if !extra.is_empty() {
            remote = remote
                .with_refspecs(extra.iter().copied(), gix::remote::Direction::Fetch)
                .map_err(err)?;
        }
        let outcome = remote
            .connect(gix::remote::Direction::Fetch)
            .map_err(err)?
            .prepare_fetch(gix::progress::Discard, Default::default())
            .map_err(err)?
            .receive(gix::progress::Discard, &AtomicBool::new(false))
            .map_err(err)?;
        tracing::debug!(repo = %self.name, status = status_name(&outcome.status), "fetched");
        Ok(())
    }

    /// The commit `refs/heads/<branch>` points to (for clones, the branch as
    /// last fetched), or `None` if there is no such branch.
    pub fn branch_head(&self, branch: &str) -> Result<Option<String>, GitError> {
        let repo = self.repo.to_thread_local();
        let name = branch_ref(&self.name, branch)?;
        let read_err = |e: gix::Error| GitError::Read {
            repo: self.name.clone(),
            what: format!("branch {branch:?}"),
            detail: chain(&e),
        };
        let Some(mut r) = repo.try_find_reference(&name).map_err(read_err)? else {
            return Ok(None);
        };
        let id = r.peel_to_id().map_err(read_err)?.detach();
        let obj = repo.find_header(id).map_err(read_err)?;
        if obj.kind() != gix::objs::Kind::Commit {
            return Err(GitError::Invalid {
                repo: self.name.clone(),
                what: format!("branch {branch:?}"),
                detail: format!("it points to a {} ({id}), not a commit", obj.kind()),
            });
        }
        Ok(Some(id.to_string()))
    }

    /// Commits reachable from `head` (a hash, abbreviated hash or branch),
    /// newest first by commit time as `git log` lists them, without any
    /// commit for which `known(hash)` is true nor anything reachable only
    /// through known commits; at most `limit`.
    pub fn new_commits(
        &self,
        head: &str,
        known: &dyn Fn(&str) -> bool,
        limit: usize,
    ) -> Result<Vec<Commit>, GitError> {
        let mut repo = self.repo.to_thread_local();
        repo.object_cache_size_if_unset(4 << 20);
        let id = self.resolve_commit(&repo, head)?;
        let mut out = Vec::new();
        if limit == 0 || known(&id.to_string()) {
            return Ok(out);
        }
        let walk_err = |e: gix::Error| GitError::Read {
            repo: self.name.clone(),
            what: format!("the history of {head:?}"),
            detail: chain(&e),
        };
        let walk = repo
            .rev_walk([id])
            .sorting(gix::revision::walk::Sorting::ByCommitTime(
                Default::default(),
            ))
            .selected(|id| !known(&id.to_string()))
            .map_err(walk_err)?;
        for info in walk {
            let info = info.map_err(walk_err)?;
            out.push(self.read_commit(&repo, info.id)?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The commit `hash` names: a full or abbreviated hex hash (a branch name
    /// or other revision gix can parse works too).
    pub fn commit(&self, hash: &str) -> Result<Commit, GitError> {
        if let Some(c) = self.cached_commit(hash) {
            return Ok(c);
        }
        let repo = self.repo.to_thread_local();
        let id = self.resolve_commit(&repo, hash)?;
        let c = self.read_commit(&repo, id)?;
        self.commits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(&c);
        Ok(c)
    }

    /// The commit of full hash `hash` if it was looked up lately: no git
    /// access, so callers on async threads may ask before going to a
    /// blocking one. A branch name or short hash is never answered here.
    pub fn cached_commit(&self, hash: &str) -> Option<Commit> {
        let full = hash.len() == 40 || hash.len() == 64;
        if !full || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let c = self.commits.lock().unwrap_or_else(|e| e.into_inner());
        c.get(&hash.to_ascii_lowercase())
    }

    /// Writes a gzip-compressed tar of the commit's tree to `out`: regular
    /// files with mode 0644 or 0755 (the tree's executable bit), directories
    /// (0755), symlinks as symlinks; submodules (gitlinks) skipped. Entry
    /// names are relative, without a leading `./`, in tree order; owner
    /// 0:0, and every mtime is the commit's committer time (as `git
    /// archive`), so the same commit always gives the same bytes. Returns
    /// the number of bytes of file content written.
    pub fn archive_tgz<W: Write>(&self, hash: &str, out: W) -> Result<u64, GitError> {
        self.source_archive(hash, out).map(|a| a.bytes)
    }

    /// [`Repo::archive_tgz`], also saying which git tree the archive holds
    /// (what a buildlet's source cache verifies).
    pub fn source_archive<W: Write>(&self, hash: &str, out: W) -> Result<Archived, GitError> {
        let repo = self.repo.to_thread_local();
        let (id, tree, mtime) = self.commit_tree(&repo, hash)?;
        let mut ar = Archiver::new(&repo, out, mtime);
        ar.tree(&tree, 0)
            .map_err(|e| self.archive_err(id, "the archive", e))?;
        let (bytes, exact) = (ar.bytes, !ar.skipped);
        ar.finish()
            .map_err(|e| self.archive_err(id, "the archive", e.into()))?;
        Ok(Archived {
            bytes,
            tree: tree.to_string(),
            exact,
        })
    }

    /// A tar.gz that turns the tree `base` into the commit's tree: changed
    /// and new entries, and a `.wh.NAME` whiteout (see the buildlet's
    /// `/writesrc`) for each path that is gone or changes between directory
    /// and file. `None` when no delta can say it exactly: `base` is not a
    /// tree of this repository, or a name starts with `.wh.`, or the tree
    /// has submodules.
    pub fn delta_tgz<W: Write>(
        &self,
        base: &str,
        hash: &str,
        out: W,
    ) -> Result<Option<String>, GitError> {
        let repo = self.repo.to_thread_local();
        let (id, tree, mtime) = self.commit_tree(&repo, hash)?;
        let Ok(base_id) = gix::ObjectId::from_hex(base.as_bytes()) else {
            return Ok(None);
        };
        match repo.find_header(base_id) {
            Ok(h) if h.kind() == gix::objs::Kind::Tree => {}
            _ => return Ok(None),
        }
        let mut ar = Archiver::new(&repo, out, mtime);
        ar.delta = true;
        match ar.diff(&base_id, &tree, 0) {
            Ok(()) if !ar.skipped => {}
            Ok(()) | Err(ArchiveError::NoDelta) => return Ok(None),
            Err(e) => return Err(self.archive_err(id, "the delta", e)),
        }
        ar.finish()
            .map_err(|e| self.archive_err(id, "the delta", e.into()))?;
        Ok(Some(tree.to_string()))
    }

    /// A commit's id, its tree, and the time archives give their entries
    /// (the committer's, as `git archive`).
    fn commit_tree(
        &self,
        repo: &gix::Repository,
        hash: &str,
    ) -> Result<(gix::ObjectId, gix::ObjectId, u64), GitError> {
        let id = self.resolve_commit(repo, hash)?;
        let commit = repo
            .find_commit(id)
            .map_err(|e| self.read_err(format!("commit {id}"), e))?;
        let decoded = commit
            .decode()
            .map_err(|e| self.read_err(format!("commit {id}"), e))?;
        let mtime = decoded
            .committer()
            .map(|s| s.seconds())
            .unwrap_or_else(|_| decoded.author().map(|s| s.seconds()).unwrap_or(0));
        Ok((id, decoded.tree(), u64::try_from(mtime).unwrap_or(0)))
    }

    /// An archiving error as the repository's error; `what` is what was
    /// being written ("the archive", "the delta").
    fn archive_err(&self, commit: gix::ObjectId, what: &str, e: ArchiveError) -> GitError {
        let archive = |detail: String| GitError::Archive {
            repo: self.name.clone(),
            commit: commit.to_string(),
            detail,
        };
        match e {
            ArchiveError::Read(what, e) => self.read_err(what, e),
            ArchiveError::Bad(detail) => archive(detail),
            ArchiveError::Io(e) => archive(format!("writing {what}: {e}")),
            ArchiveError::NoDelta => archive(format!("{what} cannot be made")),
        }
    }

    fn read_err(&self, what: String, e: gix::Error) -> GitError {
        GitError::Read {
            repo: self.name.clone(),
            what,
            detail: chain(&e),
        }
    }

    /// Resolves a full or abbreviated hash (or any revision) to a commit id.
    fn resolve_commit(&self, repo: &gix::Repository, rev: &str) -> Result<gix::ObjectId, GitError> {
        let not_found = || GitError::NotFound {
            repo: self.name.clone(),
            what: format!("commit {rev:?}"),
        };
        if rev.is_empty() {
            return Err(GitError::Invalid {
                repo: self.name.clone(),
                what: "commit \"\"".into(),
                detail: "empty revision".into(),
            });
        }
        let id = if rev.len() == repo.object_hash().len_in_hex()
            && rev.bytes().all(|b| b.is_ascii_hexdigit())
        {
            let id = gix::ObjectId::from_hex(rev.as_bytes()).map_err(|_| not_found())?;
            if !repo.has_object(id) {
                return Err(not_found());
            }
            id
        } else {
            match repo.rev_parse_single(rev) {
                Ok(id) => id.detach(),
                Err(e) if e.is_not_found() || is_plain_name(rev) => {
                    tracing::trace!(rev, error = %chain(&e), "revision not found");
                    return Err(not_found());
                }
                Err(e) => {
                    return Err(GitError::Invalid {
                        repo: self.name.clone(),
                        what: format!("commit {rev:?}"),
                        detail: chain(&e),
                    });
                }
            }
        };
        let obj = repo
            .find_object(id)
            .map_err(|e| self.read_err(format!("commit {rev:?}"), e))?;
        let kind = obj.kind;
        match obj.peel_to_kind(gix::objs::Kind::Commit) {
            Ok(c) => Ok(c.id),
            Err(_) => Err(GitError::Invalid {
                repo: self.name.clone(),
                what: format!("commit {rev:?}"),
                detail: format!("{id} is a {kind}, not a commit"),
            }),
        }
    }

    fn read_commit(
        &self,
        repo: &gix::Repository,
        id: impl Into<gix::ObjectId>,
    ) -> Result<Commit, GitError> {
        let id = id.into();
        let err = |e: gix::Error| self.read_err(format!("commit {id}"), e);
        let commit = repo.find_commit(id).map_err(err)?;
        let c = commit.decode().map_err(err)?;
        let author = c.author().map_err(err)?.trim();
        Ok(Commit {
            hash: id.to_string(),
            parents: c.parents().map(|p| p.to_string()).collect(),
            author: author.name.to_str_lossy().into_owned(),
            email: author.email.to_str_lossy().into_owned(),
            time: author.seconds(),
            subject: c.message().summary().to_str_lossy().into_owned(),
        })
    }
}

/// `refs/heads/<branch>`, or an error if git would not allow that name.
fn branch_ref(repo: &str, branch: &str) -> Result<gix::refs::FullName, GitError> {
    let full = format!("refs/heads/{branch}");
    gix::refs::FullName::try_from(full.as_str()).map_err(|e| GitError::Invalid {
        repo: repo.to_string(),
        what: format!("branch name {branch:?}"),
        detail: e.to_string(),
    })
}

/// A revision that is just a name (no `~`, `^`, `@`, `:`…): failing to
/// resolve it means it does not exist.
fn is_plain_name(rev: &str) -> bool {
    rev.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

fn status_name(s: &gix::remote::fetch::Status) -> &'static str {
    match s {
        gix::remote::fetch::Status::NoPackReceived { .. } => "up to date",
        gix::remote::fetch::Status::Change { .. } => "received a pack",
    }
}

/// Renders an error and its causes as one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !m.is_empty() && !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Tells local paths from URLs; refuses transports this build lacks.
fn classify(url: &str) -> Result<Location, GitError> {
    if url.trim().is_empty() {
        return Err(GitError::Open {
            repo: format!("{url:?}"),
            detail: "the repository url is empty".into(),
        });
    }
    if let Some((scheme, _)) = url.split_once("://")
        && !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        let scheme = scheme.to_ascii_lowercase();
        return match scheme.as_str() {
            "file" | "ssh" | "git" | "git+ssh" | "ssh+git" => Ok(Location::Remote),
            "http" | "https" => Ok(Location::Https),
            _ => Err(GitError::Unsupported {
                url: redact(url),
                reason: format!(
                    "unknown URL scheme {scheme:?}; use a local path, file://, ssh://, git:// or https://"
                ),
            }),
        };
    }
    // scp-like `user@host:path` (a colon before any slash), as git reads it.
    if let Ok(parsed) = gix::url::parse(url.as_bytes().as_bstr())
        && parsed.scheme == gix::url::Scheme::Ssh
    {
        return Ok(Location::Remote);
    }
    Ok(Location::Local(PathBuf::from(url)))
}

/// The URL with any password replaced, for messages, logs and pages.
pub fn redact_url(url: &str) -> String {
    redact(url)
}

fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

/// `cache_dir/<readable part of the url>-<hash>.git`: a URL change in the
/// config gives a fresh clone rather than reusing one of another remote.
fn clone_dir(cache_dir: &Path, url: &str) -> PathBuf {
    use sha2::Digest;
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let mut slug: String = rest
        .trim_end_matches('/')
        .trim_end_matches(".git")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed = slug.trim_matches(|c| c == '_' || c == '.');
    slug = trimmed
        .chars()
        .rev()
        .take(60)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let digest = sha2::Sha256::digest(url.as_bytes());
    let hex: String = hex::encode(&digest[..4]);
    cache_dir.join(format!("{slug}-{hex}.git"))
}

/// Opens the clone of `url` under `cache_dir`, cloning it first if needed.
fn open_clone(url: &str, cache_dir: &Path, https: Option<&HttpsAuth>) -> Result<Repo, GitError> {
    let shown = redact(url);
    let target = clone_dir(cache_dir, url);
    let clone_err = |detail: String| GitError::Clone {
        url: shown.clone(),
        path: target.display().to_string(),
        detail,
    };
    if !target.exists() {
        std::fs::create_dir_all(cache_dir)
            .map_err(|e| clone_err(format!("creating {}: {e}", cache_dir.display())))?;
        // Clone next to the target and rename: a clone cut short never
        // leaves a half-made repository where the next open would find it.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tmp = cache_dir.join(format!(
            ".{}.tmp-{}-{nanos}",
            target
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("clone"),
            std::process::id()
        ));
        let started = std::time::Instant::now();
        let result = match https {
            Some(auth) => https::clone_bare(url, &tmp, auth),
            None => gix::prepare_clone_bare(url, &tmp)
                .and_then(|prepare| {
                    // Like `git clone --bare`, but with the refspec written to the
                    // config so that later fetches update every branch.
                    prepare
                        .configure_remote(|remote| {
                            remote
                                .with_refspecs(Some(MIRROR_REFSPEC), gix::remote::Direction::Fetch)
                        })
                        .fetch_only(gix::progress::Discard, &AtomicBool::new(false))
                        .map(|_| ())
                })
                .map_err(|e| chain(&e)),
        };
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(clone_err(e));
        }
        if let Err(e) = std::fs::rename(&tmp, &target) {
            let _ = std::fs::remove_dir_all(&tmp);
            // Another open of the same URL may have won the race.
            if !target.exists() {
                return Err(clone_err(format!("moving the clone into place: {e}")));
            }
        } else {
            tracing::info!(url = %shown, path = %target.display(), elapsed = ?started.elapsed(), "cloned repository");
        }
    }
    let repo = gix::open(&target).map_err(|e| GitError::Open {
        repo: format!("{} (clone of {shown})", target.display()),
        detail: chain(&e),
    })?;
    Ok(Repo {
        repo: repo.into_sync(),
        name: shown,
        remote: Some(url.to_string()),
        https: https.cloned(),
        fetch_lock: Mutex::new(()),
        commits: Mutex::default(),
    })
}

enum ArchiveError {
    /// A delta cannot say this exactly (see [`Repo::delta_tgz`]).
    NoDelta,
    Read(String, gix::Error),
    Bad(String),
    Io(std::io::Error),
}

impl From<std::io::Error> for ArchiveError {
    fn from(e: std::io::Error) -> Self {
        ArchiveError::Io(e)
    }
}

struct Archiver<'r, W: Write> {
    repo: &'r gix::Repository,
    tar: tar::Builder<flate2::write::GzEncoder<W>>,
    mtime: u64,
    bytes: u64,
    /// Something of the tree was left out (a submodule): the archive is
    /// not exactly the git tree.
    skipped: bool,
    /// Writing a delta: a name the buildlet would read as a whiteout
    /// makes the delta impossible.
    delta: bool,
    /// The current directory, relative, with a trailing `/` unless empty.
    path: Vec<u8>,
    blob: Vec<u8>,
}

/// What [`Repo::source_archive`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archived {
    /// Bytes of file content.
    pub bytes: u64,
    /// The commit's git tree id.
    pub tree: String,
    /// The archive holds exactly that tree (no submodule left out), so a
    /// buildlet can verify it by its id.
    pub exact: bool,
}

/// The whiteout prefix of deltas (as the buildlet reads them).
const WHITEOUT: &[u8] = b".wh.";

impl<'r, W: Write> Archiver<'r, W> {
    /// Writes a tar.gz to `out`; [`Archiver::finish`] ends it.
    fn new(repo: &'r gix::Repository, out: W, mtime: u64) -> Self {
        let gz = flate2::write::GzEncoder::new(out, flate2::Compression::new(GZIP_LEVEL));
        Archiver {
            repo,
            tar: tar::Builder::new(gz),
            mtime,
            bytes: 0,
            skipped: false,
            delta: false,
            path: Vec::new(),
            blob: Vec::new(),
        }
    }

    /// Ends the tar and the gzip stream and flushes them to the output.
    fn finish(self) -> std::io::Result<()> {
        self.tar
            .into_inner()
            .and_then(|gz| gz.finish())
            .and_then(|mut w| w.flush())
    }

    /// Writes what turns tree `base` into tree `target` at the current path.
    fn diff(
        &mut self,
        base: &gix::oid,
        target: &gix::oid,
        depth: usize,
    ) -> Result<(), ArchiveError> {
        if depth > MAX_TREE_DEPTH {
            return Err(ArchiveError::NoDelta);
        }
        let read = |repo: &gix::Repository,
                    id: &gix::oid,
                    path: &[u8]|
         -> Result<Vec<(Vec<u8>, EntryKind, gix::ObjectId)>, ArchiveError> {
            let mut buf = Vec::new();
            let iter = repo
                .objects
                .find_tree_iter(id, &mut buf)
                .map_err(|e| ArchiveError::Read(format!("tree {id} ({:?})", path.as_bstr()), e))?;
            let mut out = Vec::new();
            for e in iter {
                let e = e.map_err(|e| {
                    ArchiveError::Read(format!("tree {id} ({:?})", path.as_bstr()), e)
                })?;
                if e.filename.starts_with(WHITEOUT) {
                    return Err(ArchiveError::NoDelta);
                }
                if !valid_component(e.filename) {
                    return Err(ArchiveError::Bad(format!(
                        "the tree has an entry {:?} in {:?}, which is not a safe file name",
                        e.filename,
                        path.as_bstr()
                    )));
                }
                out.push((e.filename.to_vec(), e.mode.kind(), e.oid.to_owned()));
            }
            Ok(out)
        };
        let old = read(self.repo, base, &self.path)?;
        let new = read(self.repo, target, &self.path)?;
        let old_map: std::collections::HashMap<&[u8], (EntryKind, gix::ObjectId)> = old
            .iter()
            .map(|(n, k, o)| (n.as_slice(), (*k, *o)))
            .collect();
        let new_map: std::collections::HashMap<&[u8], (EntryKind, gix::ObjectId)> = new
            .iter()
            .map(|(n, k, o)| (n.as_slice(), (*k, *o)))
            .collect();
        let is_tree = |k: EntryKind| k == EntryKind::Tree;
        // Whiteouts first: what is gone, or changes between tree and not.
        for (name, kind, _) in &old {
            let gone = match new_map.get(name.as_slice()) {
                None => true,
                Some((k, _)) => is_tree(*k) != is_tree(*kind),
            };
            if gone {
                let dir_len = self.path.len();
                self.path.extend_from_slice(WHITEOUT);
                self.path.extend_from_slice(name);
                let mut h = self.header(tar::EntryType::Regular, 0o644, 0);
                let p = to_path(&self.path)?;
                self.tar.append_data(&mut h, p.as_ref(), std::io::empty())?;
                self.path.truncate(dir_len);
            }
        }
        for (name, kind, oid) in &new {
            if *kind == EntryKind::Commit {
                self.skipped = true;
                return Err(ArchiveError::NoDelta);
            }
            match old_map.get(name.as_slice()) {
                Some((k, o)) if k == kind && o == oid => continue,
                Some((k, o)) if is_tree(*k) && is_tree(*kind) => {
                    let dir_len = self.path.len();
                    self.path.extend_from_slice(name);
                    self.path.push(b'/');
                    let r = self.diff(o, oid, depth + 1);
                    self.path.truncate(dir_len);
                    r?;
                }
                _ => self.one(name, *kind, oid, depth)?,
            }
        }
        Ok(())
    }

    /// Writes one entry (a whole subtree for a tree) at the current path.
    fn one(
        &mut self,
        name: &[u8],
        kind: EntryKind,
        oid: &gix::oid,
        depth: usize,
    ) -> Result<(), ArchiveError> {
        let dir_len = self.path.len();
        self.path.extend_from_slice(name);
        let result = self.entry(kind, oid, depth);
        self.path.truncate(dir_len);
        result
    }

    fn header(&self, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(self.mtime);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    fn tree(&mut self, id: &gix::oid, depth: usize) -> Result<(), ArchiveError> {
        if depth > MAX_TREE_DEPTH {
            return Err(ArchiveError::Bad(format!(
                "trees nested deeper than {MAX_TREE_DEPTH} levels at {:?}",
                self.path.as_bstr()
            )));
        }
        let mut buf = Vec::new();
        let entries = self
            .repo
            .objects
            .find_tree_iter(id, &mut buf)
            .map_err(|e| ArchiveError::Read(format!("tree {id} ({:?})", self.path.as_bstr()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| {
                ArchiveError::Read(format!("tree {id} ({:?})", self.path.as_bstr()), e)
            })?;
            let name = entry.filename;
            if self.delta && name.starts_with(WHITEOUT) {
                return Err(ArchiveError::NoDelta);
            }
            if !valid_component(name) {
                return Err(ArchiveError::Bad(format!(
                    "the tree has an entry {:?} in {:?}, which is not a safe file name",
                    name,
                    if self.path.is_empty() {
                        ".".into()
                    } else {
                        self.path.as_bstr().to_string()
                    }
                )));
            }
            let dir_len = self.path.len();
            self.path.extend_from_slice(name);
            let result = self.entry(entry.mode.kind(), entry.oid, depth);
            self.path.truncate(dir_len);
            result?;
        }
        Ok(())
    }

    /// Writes the entry at the current path: a directory and its tree, a
    /// file, a symbolic link; a submodule is left out (and noted).
    fn entry(&mut self, kind: EntryKind, oid: &gix::oid, depth: usize) -> Result<(), ArchiveError> {
        match kind {
            EntryKind::Tree => {
                let mut h = self.header(tar::EntryType::Directory, 0o755, 0);
                let p = to_path(&self.path)?;
                self.tar.append_data(&mut h, p.as_ref(), std::io::empty())?;
                self.path.push(b'/');
                self.tree(oid, depth + 1)
            }
            EntryKind::Blob | EntryKind::BlobExecutable => {
                let mode = if kind == EntryKind::BlobExecutable {
                    0o755
                } else {
                    0o644
                };
                self.with_blob(oid, |this, data| {
                    let mut h = this.header(tar::EntryType::Regular, mode, data.len() as u64);
                    this.tar
                        .append_data(&mut h, to_path(&this.path)?.as_ref(), data)?;
                    this.bytes += data.len() as u64;
                    Ok(())
                })
            }
            EntryKind::Link => self.with_blob(oid, |this, target| {
                if target.is_empty() || target.contains(&0) {
                    return Err(ArchiveError::Bad(format!(
                        "symlink {:?} has an invalid target",
                        this.path.as_bstr()
                    )));
                }
                // tar normalizes some targets (`a//b`, `a/./b`): such a
                // link arrives changed, so the tree is not exactly git's
                // and is not cached (see `Archived::exact`).
                if target.windows(2).any(|w| w == b"//")
                    || target.windows(3).any(|w| w == b"/./")
                    || target.starts_with(b"./")
                    || target.ends_with(b"/.")
                    || (target.len() > 1 && target.ends_with(b"/"))
                {
                    this.skipped = true;
                }
                let mut h = this.header(tar::EntryType::Symlink, 0o777, 0);
                this.tar.append_link(
                    &mut h,
                    to_path(&this.path)?.as_ref(),
                    to_path(target)?.as_ref(),
                )?;
                Ok(())
            }),
            // Submodules: the buildlet gets this repository's tree only.
            EntryKind::Commit => {
                self.skipped = true;
                Ok(())
            }
        }
    }

    /// Reads blob `id` and hands its content to `f`, reusing one buffer.
    fn with_blob(
        &mut self,
        id: &gix::oid,
        f: impl FnOnce(&mut Self, &[u8]) -> Result<(), ArchiveError>,
    ) -> Result<(), ArchiveError> {
        let mut buf = std::mem::take(&mut self.blob);
        let result = match self.repo.objects.find_blob(id, &mut buf) {
            Ok(blob) => f(self, blob.data),
            Err(e) => Err(ArchiveError::Read(
                format!("file {:?} (blob {id})", self.path.as_bstr()),
                e,
            )),
        };
        self.blob = buf;
        result
    }
}

/// A tree entry name that is safe as a path component everywhere the
/// archive is extracted: not empty, `.`, `..` or `.git`, no `/`, `\` or NUL.
fn valid_component(name: &BStr) -> bool {
    !(name.is_empty()
        || name == "."
        || name == ".."
        || name.eq_ignore_ascii_case(b".git")
        || name.contains(&b'/')
        || name.contains(&b'\\')
        || name.contains(&0))
}

fn to_path(bytes: &[u8]) -> Result<Cow<'_, Path>, ArchiveError> {
    gix::path::from_byte_slice(bytes)
        .map(Cow::Borrowed)
        .map_err(|_| {
            ArchiveError::Bad(format!(
                "path {:?} is not valid on this platform",
                bytes.as_bstr()
            ))
        })
}

/// A commit for [`write_history`].
#[derive(Debug, Clone)]
pub struct NewCommit {
    pub message: String,
    pub author: String,
    pub email: String,
    /// Author and committer time, unix seconds (UTC).
    pub time: i64,
    /// Files added or replaced relative to the previous commit's tree:
    /// (relative path with `/` separators, content, executable).
    pub files: Vec<(String, Vec<u8>, bool)>,
}

/// Appends `commits` (oldest first) to `branch` of the repository at `path`,
/// each commit's files applied on top of the previous tree. The repository
/// is created bare (with `HEAD` on `branch`) if `path` does not exist or is
/// empty. Uses no git binary. Returns the new head's hash.
pub fn write_history(path: &Path, branch: &str, commits: &[NewCommit]) -> Result<String, GitError> {
    let name = path.display().to_string();
    let werr = |what: &str, e: gix::Error| GitError::Write {
        repo: name.clone(),
        what: what.to_string(),
        detail: chain(&e),
    };
    let ref_name = branch_ref(&name, branch)?;
    let full = ref_name.as_bstr().to_string();
    let is_empty_dir = path
        .read_dir()
        .map(|mut d| d.next().is_none())
        .unwrap_or(false);
    let repo = if !path.exists() || is_empty_dir {
        let repo = gix::init_bare(path).map_err(|e| werr("a new repository", e))?;
        use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit};
        repo.edit_reference(RefEdit {
            change: Change::Update {
                log: LogChange::default(),
                expected: PreviousValue::Any,
                new: gix::refs::Target::Symbolic(ref_name.clone()),
            },
            name: "HEAD".try_into().expect("valid ref name"),
            deref: false,
        })
        .map_err(|e| werr("HEAD", e))?;
        repo
    } else {
        gix::open(path).map_err(|e| GitError::Open {
            repo: name.clone(),
            detail: chain(&e),
        })?
    };
    let mut parent = match repo
        .try_find_reference(&ref_name)
        .map_err(|e| werr(&full, e))?
    {
        Some(mut r) => Some(r.peel_to_id().map_err(|e| werr(&full, e))?.detach()),
        None => None,
    };
    for c in commits {
        let base = match parent {
            Some(p) => repo
                .find_commit(p)
                .and_then(|c| c.tree_id())
                .map_err(|e| werr("the parent tree", e))?
                .detach(),
            None => gix::ObjectId::empty_tree(repo.object_hash()),
        };
        let mut editor = repo.edit_tree(base).map_err(|e| werr("a tree", e))?;
        for (file, content, exec) in &c.files {
            let blob = repo
                .write_blob(content)
                .map_err(|e| werr(file, e))?
                .detach();
            let kind = if *exec {
                EntryKind::BlobExecutable
            } else {
                EntryKind::Blob
            };
            editor
                .upsert(file.as_str(), kind, blob)
                .map_err(|e| werr(file, e))?;
        }
        let tree = editor.write().map_err(|e| werr("a tree", e))?.detach();
        let sig = gix::actor::Signature {
            name: c.author.as_str().into(),
            email: c.email.as_str().into(),
            time: gix::date::Time::new(c.time, 0),
        };
        let mut time_buf = gix::date::parse::TimeBuf::default();
        let sig_ref = sig.to_ref(&mut time_buf);
        let mut message = c.message.clone();
        if !message.ends_with('\n') {
            message.push('\n');
        }
        let id = repo
            .commit_as(sig_ref, sig_ref, ref_name.as_ref(), &message, tree, parent)
            .map_err(|e| werr("a commit", e))?;
        parent = Some(id.detach());
    }
    parent
        .map(|p| p.to_string())
        .ok_or_else(|| GitError::NotFound {
            repo: name.clone(),
            what: format!("branch {branch:?} (no commits given)"),
        })
}

#[cfg(test)]
mod tests {
    use super::{Commit, CommitCache};

    fn commit(i: usize) -> Commit {
        Commit {
            hash: format!("{i:040x}"),
            parents: Vec::new(),
            author: String::new(),
            email: String::new(),
            time: i as i64,
            subject: String::new(),
        }
    }

    /// The cache holds the last `CAP` commits, oldest out first.
    #[test]
    fn the_commit_cache_is_bounded() {
        let mut c = CommitCache::default();
        for i in 0..CommitCache::CAP + 10 {
            c.put(&commit(i));
            c.put(&commit(i)); // a second put does not count twice
        }
        assert_eq!(c.by_hash.len(), CommitCache::CAP);
        assert_eq!(c.order.len(), CommitCache::CAP);
        assert!(c.get(&commit(9).hash).is_none());
        assert_eq!(c.get(&commit(10).hash), Some(commit(10)));
        assert_eq!(
            c.get(&commit(CommitCache::CAP + 9).hash),
            Some(commit(CommitCache::CAP + 9))
        );
    }
}
