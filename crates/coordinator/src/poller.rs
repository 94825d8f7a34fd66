//! Watching repositories: every repo's branches are polled with the git
//! library; each new commit is recorded and one post-submit build is queued
//! per builder whose policy covers that repo and branch.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::farm::Farm;
use crate::store::{BuildKind, CommitRow, NewBuild};

/// How many new commits one poll takes from a branch it has seen before (a
/// burst of pushes builds the newest ones). The first poll of a branch
/// takes the repo's `backfill`.
pub const MAX_NEW_COMMITS: usize = 50;

/// Polls one repo forever at its configured interval.
pub async fn poll_loop(farm: Arc<Farm>, repo: String) {
    loop {
        let interval = match farm.config().repos.get(&repo) {
            Some(r) => r.poll_interval,
            None => return,
        };
        match poll_once(&farm, &repo).await {
            Ok(n) => {
                farm.poll_errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&repo);
                if n > 0 {
                    tracing::info!(%repo, builds = n, "queued builds for new commits");
                }
            }
            Err(e) => {
                tracing::warn!(%repo, "polling failed: {e}");
                farm.poll_errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(repo.clone(), e);
            }
        }
        // A push webhook wakes the poll early; the interval stays the
        // safety net for hooks that never come.
        let wake = farm.poll_waker(&repo);
        tokio::select! {
            _ = tokio::time::sleep(interval.max(Duration::from_millis(100))) => {}
            _ = wake.notified() => {}
        }
    }
}

/// One poll of every branch of a repo. Returns the number of builds queued.
pub async fn poll_once(farm: &Arc<Farm>, repo: &str) -> Result<usize, String> {
    let cfg = farm.config();
    let rc = cfg
        .repos
        .get(repo)
        .ok_or_else(|| format!("repo {repo:?} is not configured"))?
        .clone();
    let r = farm.repo(repo).await?;
    {
        let r = r.clone();
        tokio::task::spawn_blocking(move || r.fetch())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    let mut queued = 0;
    for branch in &rc.branches {
        let known: HashSet<String> = farm
            .store
            .known_commits(repo, branch)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect();
        // The first poll of a branch: its history is built only as far as
        // the repo's `backfill` says; with 0, the head is recorded as where
        // the farm started, and only later commits are built.
        let first = known.is_empty();
        let take = if first {
            (rc.backfill as usize).max(1)
        } else {
            MAX_NEW_COMMITS
        };
        let build = !(first && rc.backfill == 0);
        let r2 = r.clone();
        let br = branch.clone();
        let commits =
            tokio::task::spawn_blocking(move || -> Result<Vec<crate::git::Commit>, String> {
                let Some(head) = r2.branch_head(&br).map_err(|e| e.to_string())? else {
                    return Err(format!("branch {br:?} does not exist"));
                };
                r2.new_commits(&head, &|h| known.contains(h), take)
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())??;
        // Oldest first, so ids grow with history; the scheduler still
        // serves the newest commit first.
        for c in commits.iter().rev() {
            let row = CommitRow {
                repo: repo.to_string(),
                hash: c.hash.clone(),
                author: c.author.clone(),
                email: c.email.clone(),
                time: c.time,
                subject: c.subject.clone(),
                parents: c.parents.clone(),
            };
            for b in cfg.builders_for(repo, branch).into_iter().filter(|_| build) {
                let nb = NewBuild {
                    builder: b.name.clone(),
                    host_type: b.host_type.clone(),
                    repo: repo.to_string(),
                    branch: branch.clone(),
                    commit: c.hash.clone(),
                    commit_time: c.time,
                    kind: BuildKind::PostSubmit,
                    requested_by: String::new(),
                };
                if let Some(row) = farm
                    .store
                    .create_build(&nb)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    farm.enqueue(row);
                    queued += 1;
                }
            }
            // Recorded only once its builds exist: a coordinator killed in
            // between sees the commit as new again and creates what is
            // missing (creating a post-submit build is idempotent).
            farm.store
                .add_commit(&row, branch)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(queued)
}
