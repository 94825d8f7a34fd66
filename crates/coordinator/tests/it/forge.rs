//! Living with a forge: `https://` remotes through a real smart-HTTP git
//! server over TLS (nginx, fcgiwrap, git http-backend), webhooks signed as
//! the forges sign them, commit statuses and notifications sent to local
//! servers that check every request.

use crate::common::gitserver::GitServer;
use crate::common::inproc::{InProc, rt};
use crate::common::{TestRepo, git};

use std::time::Duration;

use coordinator::poller::poll_once;
use coordinator::store::{BuildKind, BuildStatus};

const PASSWORD: &str = "correct-horse-battery-staple";

fn https_config(server: &GitServer, app: &str, gone: &str) -> String {
    let ca = server.ca.display();
    let base = &server.base;
    format!(
        r#"[farm]
heartbeat = "1s"

[secrets]
forge = {{}}
wrong = {{}}

[repos.app]
url = "{app}"
username = "farmer"
password = "secret:forge"
ca_file = "{ca}"

[repos.bad]
url = "{app}"
username = "farmer"
password = "secret:wrong"
ca_file = "{ca}"

[repos.gone]
url = "{gone}"
username = "farmer"
password = "secret:forge"
ca_file = "{ca}"

[repos.junk]
url = "{base}/junk/app.git"
ca_file = "{ca}"

[repos.untrusted]
url = "{app}"
username = "farmer"
password = "secret:forge"

[hosts.host-a]
pool = "reverse"
trusted = true

[builders.b]
host = "host-a"
repos = ["app"]
[[builders.b.steps]]
name = "show"
run = "cat a.txt"
"#
    )
}

/// An `https://` repository with a password from the secret store is
/// cloned once, fetched incrementally, and built; a wrong password, a
/// repository that disappears, a server that answers garbage and a
/// certificate nobody trusts each give that repo a clear error and leave
/// the others working.
#[test]
fn https_remotes_with_credentials_are_polled_and_built() {
    rt().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let server = GitServer::start(&tmp.path().join("srv"), "farmer", PASSWORD);
        let mut repo = TestRepo::new(&tmp.path().join("work"));
        repo.commit("one", &[("a.txt", "first\n")]);
        let app = server.publish(&repo.path, "app");
        let gone = server.publish(&repo.path, "gone");
        let f = InProc::start_with_secrets(
            &https_config(&server, &app, &gone),
            &[("forge", PASSWORD), ("wrong", "not-the-password")],
        )
        .await;
        f.machine("host-a", "m1").await;

        assert_eq!(poll_once(&f.farm, "app").await, Ok(1));
        let id = f.farm.store.builds(&Default::default()).await.unwrap()[0].id;
        assert_eq!(f.finished(id).await.status, BuildStatus::Passed);
        assert!(f.step_log(id, 0).await.contains("first"));

        // A marker in the clone shows the next poll fetches into it
        // rather than cloning again.
        let clones: Vec<_> = std::fs::read_dir(f.farm.data_dir.join("git/app"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(clones.len(), 1, "{clones:?}");
        std::fs::write(clones[0].join("farmer-test-marker"), "").unwrap();
        let second = repo.commit("two", &[("a.txt", "second\n")]);
        server.publish(&repo.path, "app");
        assert_eq!(poll_once(&f.farm, "app").await, Ok(1));
        assert!(
            clones[0].join("farmer-test-marker").exists(),
            "the repo was cloned again"
        );
        let b = f.farm.store.builds(&Default::default()).await.unwrap();
        let newest = b
            .iter()
            .find(|b| b.commit == second)
            .expect("a build of the new commit");
        assert_eq!(f.finished(newest.id).await.status, BuildStatus::Passed);
        assert!(f.step_log(newest.id, 0).await.contains("second"));

        let err = poll_once(&f.farm, "bad").await.unwrap_err();
        assert!(
            err.contains("authentication failed") && err.contains("\"farmer\""),
            "{err}"
        );
        assert!(
            !err.contains("not-the-password") && !err.contains(PASSWORD),
            "{err}"
        );

        assert_eq!(
            poll_once(&f.farm, "gone").await,
            Ok(0),
            "gone is built by nobody"
        );
        std::fs::remove_dir_all(server.repos.join("gone.git")).unwrap();
        let err = poll_once(&f.farm, "gone").await.unwrap_err();
        assert!(
            err.contains("gone.git") && err.contains("not found"),
            "{err}"
        );

        let err = poll_once(&f.farm, "junk").await.unwrap_err();
        assert!(err.contains("junk/app.git"), "{err}");

        let err = poll_once(&f.farm, "untrusted").await.unwrap_err();
        assert!(err.to_lowercase().contains("certificate"), "{err}");

        // The good repo is untouched by its neighbours' failures.
        assert_eq!(poll_once(&f.farm, "app").await, Ok(0));
    });
}

const HOOK_SECRET: &str = "hook-secret-4f9a1c";
const GH_TOKEN: &str = "ghp_statusToken0123456789";

fn github_push(after: &str) -> Vec<u8> {
    serde_json::json!({
        "ref": "refs/heads/main",
        "before": "0000000000000000000000000000000000000000",
        "after": after,
        "created": false,
        "deleted": false,
        "forced": false,
        "repository": { "id": 1, "name": "app", "full_name": "org/app", "clone_url": "https://github.com/org/app.git" },
        "pusher": { "name": "alice", "email": "alice@example.com" },
        "sender": { "login": "alice" },
        "commits": [{ "id": after, "message": "two", "distinct": true }]
    })
    .to_string()
    .into_bytes()
}

fn github_pull(action: &str, number: u64, head: &str) -> Vec<u8> {
    serde_json::json!({
        "action": action,
        "number": number,
        "pull_request": {
            "number": number,
            "state": "open",
            "title": "Make it faster",
            "user": { "login": "alice" },
            "head": { "ref": "feature", "sha": head, "repo": { "full_name": "alice/app" } },
            "base": { "ref": "main", "sha": "1111111111111111111111111111111111111111", "repo": { "full_name": "org/app" } }
        },
        "repository": { "id": 1, "name": "app", "full_name": "org/app" },
        "sender": { "login": "alice" }
    })
    .to_string()
    .into_bytes()
}

fn hooks_config(repo: &std::path::Path, api: &str) -> String {
    let r = repo.display();
    format!(
        r#"[farm]
heartbeat = "1s"
url = "https://farm.example.com"

[secrets]
hook = {{}}
gh = {{}}

[repos.app]
url = "{r}"
poll_interval = "1h"
backfill = 1
[repos.app.forge]
type = "github"
repository = "org/app"
api = "{api}"
webhook_secret = "secret:hook"
status_token = "secret:gh"

[repos.gt]
url = "{r}"
poll_interval = "1h"
backfill = 0
[repos.gt.forge]
type = "forgejo"
repository = "org/gt"
api = "{api}/api/v1"
webhook_secret = "secret:hook"
status_token = "secret:gh"

[repos.gl]
url = "{r}"
poll_interval = "1h"
backfill = 0
[repos.gl.forge]
type = "gitlab"
repository = "group/gl"
webhook_secret = "secret:hook"

[hosts.host-a]
pool = "reverse"
trusted = true

[builders.post]
host = "host-a"
repos = ["app"]
[[builders.post.steps]]
name = "check"
run = "cat a.txt"

[builders.pre]
host = "host-a"
repos = ["app", "gt", "gl"]
presubmit = true
[[builders.pre.steps]]
name = "check"
run = "cat a.txt"
"#
    )
}

/// Webhooks from GitHub, Forgejo and GitLab, signed as each signs them:
/// unsigned, wrongly signed, edited-after-signing, oversized and misrouted
/// deliveries are refused with a reason and change nothing; a push polls
/// at once (the timed poll is an hour away); a pull request builds its head
/// on the pre-submit builder only, once; every delivery is listed on the
/// repo's page; commit statuses reach the forge's API as its documentation
/// says, retried when the API fails.
#[test]
fn webhooks_trigger_builds_and_statuses_reach_the_forge() {
    use coordinator::forge::verify::sign;
    rt().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let mut repo = TestRepo::new(&tmp.path().join("work"));
        let first = repo.commit("one", &[("a.txt", "first\n")]);
        let api = crate::common::recorder::Recorder::start(1);
        let f = InProc::start_with_secrets(
            &hooks_config(&repo.path, &api.url),
            &[("hook", HOOK_SECRET), ("gh", GH_TOKEN)],
        )
        .await;
        f.machine("host-a", "m1").await;
        f.farm.apply_config();
        // The first poll builds the head (backfill = 1) on both builders
        // (a pre-submit builder builds its branches after submit too).
        let b = builds_until(&f, "the first builds", |b| {
            b.iter().filter(|b| b.commit == first && b.status == BuildStatus::Passed).count() == 2
        })
        .await;
        assert_eq!(b.len(), 2, "{b:?}");

        let hook = |forge: &str| format!("/hooks/{forge}");
        let second = repo.commit("two", &[("a.txt", "second\n")]);
        let body = github_push(&second);
        let good_sig = format!("sha256={}", sign(HOOK_SECRET, &body));
        let gh = |sig: &str, event: &str, id: &str| -> Vec<(String, String)> {
            let mut h = vec![
                ("X-GitHub-Event".to_string(), event.to_string()),
                ("X-GitHub-Delivery".to_string(), id.to_string()),
                ("Content-Type".to_string(), "application/json".to_string()),
                ("User-Agent".to_string(), "GitHub-Hookshot/abc".to_string()),
            ];
            if !sig.is_empty() {
                h.push(("X-Hub-Signature-256".to_string(), sig.to_string()));
            }
            h
        };
        let send = |headers: Vec<(String, String)>, path: String, body: Vec<u8>| {
            let f = &f;
            async move {
                let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                f.request("POST", &path, &h, body).await
            }
        };

        // Refused: unsigned, wrong secret, edited after signing, oversized.
        // Without ?repo= a delivery no repo's secret verifies is refused
        // before its payload is even parsed; with it, the repo's page says why.
        let app_hook = format!("{}?repo=app", hook("github"));
        let (code, text) = send(gh("", "push", "d-anon"), hook("github"), body.clone()).await;
        assert_eq!(code, 401, "{text}");
        assert!(text.contains("verifies this delivery"), "{text}");
        let (code, text) = send(gh("", "push", "d-unsigned"), app_hook.clone(), body.clone()).await;
        assert_eq!(code, 401, "{text}");
        assert!(text.contains("not signed"), "{text}");
        let wrong = format!("sha256={}", sign("not-the-secret", &body));
        let (code, text) = send(gh(&wrong, "push", "d-wrong"), app_hook.clone(), body.clone()).await;
        assert_eq!(code, 401, "{text}");
        assert!(text.contains("does not match"), "{text}");
        let edited = String::from_utf8(body.clone()).unwrap().replace("alice", "mallory").into_bytes();
        let (code, _) = send(gh(&good_sig, "push", "d-edited"), hook("github"), edited.clone()).await;
        assert_eq!(code, 401);
        let (code, _) = send(gh(&good_sig, "push", "d-edited"), app_hook.clone(), edited).await;
        assert_eq!(code, 401);
        let huge = vec![b' '; 5 << 20];
        let (code, text) = send(gh(&good_sig, "push", "d-huge"), format!("{}?repo=app", hook("github")), huge).await;
        assert_eq!(code, 413, "{text}");
        // None of them polled: the new commit has no build.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let b = f.farm.store.builds(&Default::default()).await.unwrap();
        assert!(!b.iter().any(|b| b.commit == second), "{b:?}");

        // A signed ping, then a signed push: polled at once.
        let ping = br#"{"zen":"Keep it logically awesome.","hook_id":1,"repository":{"full_name":"org/app"}}"#.to_vec();
        let ping_sig = format!("sha256={}", sign(HOOK_SECRET, &ping));
        let (code, text) = send(gh(&ping_sig, "ping", "d-ping"), hook("github"), ping).await;
        assert_eq!(code, 200, "{text}");
        let (code, text) = send(gh(&good_sig, "push", "d-push"), hook("github"), body.clone()).await;
        assert_eq!(code, 200, "{text}");
        assert!(text.contains("polling now"), "{text}");
        builds_until(&f, "a build of the pushed commit", |b| {
            b.iter().any(|b| b.commit == second && b.status == BuildStatus::Passed)
        })
        .await;

        // A pull request: its head (refs/pull/7/head, not on any branch)
        // is built on the pre-submit builder only; a redelivery is a no-op.
        git(&repo.path, &["checkout", "-q", "-b", "feature"]);
        let pr_head = repo.commit("faster", &[("a.txt", "pull request\n")]);
        git(&repo.path, &["update-ref", "refs/pull/7/head", &pr_head]);
        git(&repo.path, &["checkout", "-q", "main"]);
        git(&repo.path, &["branch", "-q", "-D", "feature"]);
        let pr = github_pull("opened", 7, &pr_head);
        let pr_sig = format!("sha256={}", sign(HOOK_SECRET, &pr));
        let (code, text) = send(gh(&pr_sig, "pull_request", "d-pr"), hook("github"), pr.clone()).await;
        assert_eq!(code, 200, "{text}");
        assert!(text.contains("queued pre"), "{text}");
        let b = builds_until(&f, "the pull request's build", |b| {
            b.iter().any(|b| b.commit == pr_head && b.status == BuildStatus::Passed)
        })
        .await;
        let pr_builds: Vec<_> = b.iter().filter(|b| b.commit == pr_head).collect();
        assert_eq!(pr_builds.len(), 1, "{pr_builds:?}");
        assert_eq!(pr_builds[0].builder, "pre");
        assert_eq!(pr_builds[0].kind, BuildKind::PreSubmit);
        assert!(f.step_log(pr_builds[0].id, 0).await.contains("pull request"));
        let (code, text) = send(gh(&pr_sig, "pull_request", "d-pr"), hook("github"), pr).await;
        assert_eq!(code, 200, "{text}");
        assert!(text.contains("already built"), "{text}");
        // A closed pull request is understood and ignored.
        let closed = github_pull("closed", 7, &pr_head);
        let sig = format!("sha256={}", sign(HOOK_SECRET, &closed));
        let (code, text) = send(gh(&sig, "pull_request", "d-closed"), hook("github"), closed).await;
        assert_eq!(code, 200, "{text}");
        assert!(text.contains("nothing to do"), "{text}");

        // Forgejo: its own headers and signature; found by repository name.
        git(&repo.path, &["update-ref", "refs/pull/3/head", &pr_head]);
        let fj = serde_json::json!({
            "action": "opened", "number": 3,
            "pull_request": { "number": 3, "user": { "login": "bob" },
                "head": { "ref": "feature", "sha": pr_head }, "base": { "ref": "main" } },
            "repository": { "full_name": "org/gt" }
        }).to_string().into_bytes();
        let sig = sign(HOOK_SECRET, &fj);
        let h = vec![
            ("X-Forgejo-Event".to_string(), "pull_request".to_string()),
            ("X-Gitea-Event".to_string(), "pull_request".to_string()),
            ("X-Forgejo-Signature".to_string(), sig.clone()),
            ("X-Gitea-Signature".to_string(), sig),
            ("X-Gitea-Delivery".to_string(), "fj-1".to_string()),
        ];
        let (code, text) = send(h.clone(), hook("forgejo"), fj.clone()).await;
        assert_eq!(code, 200, "{text}");
        assert!(text.contains("queued pre"), "{text}");
        // The same Forgejo delivery at the GitHub hook is refused.
        let (code, text) = send(h, format!("{}?repo=gt", hook("github")), fj).await;
        assert_eq!(code, 400, "{text}");
        assert!(text.contains("configured for gitea"), "{text}");

        // GitLab: the token header, a merge request.
        git(&repo.path, &["update-ref", "refs/merge-requests/5/head", &pr_head]);
        let gl = serde_json::json!({
            "object_kind": "merge_request", "event_type": "merge_request",
            "user": { "username": "carol" },
            "project": { "path_with_namespace": "group/gl" },
            "object_attributes": { "iid": 5, "action": "open", "source_branch": "feature",
                "target_branch": "main", "last_commit": { "id": pr_head } }
        }).to_string().into_bytes();
        let h = vec![
            ("X-Gitlab-Event".to_string(), "Merge Request Hook".to_string()),
            ("X-Gitlab-Token".to_string(), "wrong".to_string()),
        ];
        let (code, _) = send(h, hook("gitlab"), gl.clone()).await;
        assert_eq!(code, 401);
        let h = vec![
            ("X-Gitlab-Event".to_string(), "Merge Request Hook".to_string()),
            ("X-Gitlab-Token".to_string(), HOOK_SECRET.to_string()),
        ];
        let (code, text) = send(h, hook("gitlab"), gl).await;
        assert_eq!(code, 200, "{text}");
        assert!(text.contains("queued pre"), "{text}");

        // The repo's page lists its deliveries, refused ones with why.
        let (code, page) = f.request("GET", "/repos/app", &[], Vec::new()).await;
        assert_eq!(code, 200, "{page}");
        for needle in ["d-unsigned", "not signed", "d-wrong", "does not match", "d-huge", "larger than", "d-push", "polling now", "d-pr", "already built", "/hooks/github?repo=app"] {
            assert!(page.contains(needle), "the repo page lacks {needle:?}: {page}");
        }
        assert!(!page.contains(HOOK_SECRET) && !page.contains(GH_TOKEN));

        // Commit statuses for app's builds: the API failed once (500) and
        // the status was sent again; each request is what GitHub documents.
        let all = api.wait_until("a success status for the pushed commit", Duration::from_secs(30), |r| {
            r.iter().any(|r| r.path.ends_with(&second) && r.body["state"] == "success" && r.body["context"] == "farmer/post")
        });
        for r in &all {
            assert_eq!(r.method, "POST");
            if r.path.starts_with("/api/v1/") {
                // Forgejo/Gitea: the same shape under its API, its token scheme.
                assert!(r.path.starts_with("/api/v1/repos/org/gt/statuses/"), "{r:?}");
                assert_eq!(r.headers.get("authorization").map(String::as_str), Some(format!("token {GH_TOKEN}").as_str()));
            } else {
                assert!(r.path.starts_with("/repos/org/app/statuses/"), "{r:?}");
                assert_eq!(r.headers.get("authorization").map(String::as_str), Some(format!("Bearer {GH_TOKEN}").as_str()));
                assert_eq!(r.headers.get("accept").map(String::as_str), Some("application/vnd.github+json"));
                assert_eq!(r.headers.get("x-github-api-version").map(String::as_str), Some("2022-11-28"));
            }
            assert_eq!(r.headers.get("content-type").map(String::as_str), Some("application/json"));
            assert!(r.headers.contains_key("user-agent"));
            let state = r.body["state"].as_str().unwrap();
            assert!(["pending", "success", "failure", "error"].contains(&state), "{r:?}");
            let url = r.body["target_url"].as_str().unwrap();
            assert!(url.starts_with("https://farm.example.com/builds/"), "{url}");
            assert!(r.body["description"].as_str().unwrap().len() <= 140);
        }
        assert!(all.iter().any(|r| r.path.ends_with(&pr_head) && r.body["context"] == "farmer/pre"), "{all:#?}");
        api.wait_until("the Forgejo pull request's status", Duration::from_secs(30), |r| {
            r.iter().any(|r| r.path == format!("/api/v1/repos/org/gt/statuses/{pr_head}") && r.body["state"] == "success")
        });
        // gl sends no statuses (no status_token).
        assert!(!api.all().iter().any(|r| r.path.contains("group/gl")));
        let page: serde_json::Value =
            serde_json::from_str(&f.get("/repos/app?mode=json").await).unwrap();
        let messages = page["messages"].as_array().unwrap();
        assert!(
            messages.iter().any(|m| m["kind"] == "status" && m["state"] == "sent"),
            "{page}"
        );
    });
}

/// The builds of the in-process farm, once `f` holds for them (bounded).
async fn builds_until(
    f: &InProc,
    what: &str,
    ok: impl Fn(&[coordinator::store::BuildRow]) -> bool,
) -> Vec<coordinator::store::BuildRow> {
    let start = std::time::Instant::now();
    loop {
        let b = f.farm.store.builds(&Default::default()).await.unwrap();
        if ok(&b) {
            return b;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}: {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real SMTP server on loopback (Python's aiosmtpd) that stores every
/// mail it is given in a maildir.
struct SmtpSink {
    port: u16,
    maildir: std::path::PathBuf,
    _proc: crate::common::Stopped,
}

impl SmtpSink {
    fn start(dir: &std::path::Path) -> SmtpSink {
        use std::os::unix::process::CommandExt;
        let ok = std::process::Command::new("python3")
            .args(["-c", "import aiosmtpd"])
            .status()
            .unwrap();
        assert!(
            ok.success(),
            "python3 lacks aiosmtpd: install it (scripts/test does)"
        );
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let maildir = dir.join("maildir");
        let proc = crate::common::Stopped(
            std::process::Command::new("python3")
                .args([
                    "-m",
                    "aiosmtpd",
                    "-n",
                    "-l",
                    &format!("127.0.0.1:{port}"),
                    "-c",
                    "aiosmtpd.handlers.Mailbox",
                ])
                .arg(&maildir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap(),
        );
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "aiosmtpd did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        SmtpSink {
            port,
            maildir,
            _proc: proc,
        }
    }

    /// Every mail received, as text.
    fn mails(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(rd) = std::fs::read_dir(self.maildir.join(sub)) {
                for e in rd.flatten() {
                    out.push(std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        out
    }
}

/// A branch going red is told once (by JSON webhook and by mail through a
/// real SMTP server), staying red is not told again, and going green again
/// is told once; a pre-submit failure tells nobody.
#[test]
fn a_branch_going_red_and_green_again_is_told_once_each_way() {
    rt().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let smtp = SmtpSink::start(tmp.path());
        let chat = crate::common::recorder::Recorder::start(0);
        let mut repo = TestRepo::new(&tmp.path().join("work"));
        let c1 = repo.commit("good", &[("a.txt", "1\n")]);
        let cfg = format!(
            r#"[farm]
heartbeat = "1s"
url = "https://farm.example.com"

[smtp]
server = "smtp://127.0.0.1:{port}"
from = "Farmer <farmer@example.com>"

[repos.r]
url = "{repo}"
backfill = 1
[repos.r.notify]
webhook = "{chat}/hooks/farm"
email = ["team@example.com"]

[hosts.host-a]
pool = "reverse"
trusted = true

[builders.b]
host = "host-a"
presubmit = true
[[builders.b.steps]]
name = "test"
run = "test ! -e broken || {{ echo 'it is broken'; exit 1; }}"
"#,
            port = smtp.port,
            repo = repo.path.display(),
            chat = chat.url,
        );
        let f = InProc::start(&cfg).await;
        f.machine("host-a", "m1").await;
        let mut expect = |c: String, status: BuildStatus| {
            let f = &f;
            async move {
                assert_eq!(poll_once(&f.farm, "r").await, Ok(1));
                let b = builds_until(f, "the build", |b| {
                    b.iter().any(|b| {
                        b.commit == c
                            && b.status != BuildStatus::Queued
                            && b.status != BuildStatus::Running
                    })
                })
                .await;
                let b = b.into_iter().find(|b| b.commit == c).unwrap();
                assert_eq!(b.status, status, "{b:?}");
                b.id
            }
        };
        let _ = &mut expect;
        expect(c1.clone(), BuildStatus::Passed).await;
        let c2 = repo.commit("break it", &[("broken", "yes\n")]);
        let broke = expect(c2.clone(), BuildStatus::Failed).await;
        let c3 = repo.commit("still broken", &[("b.txt", "x\n")]);
        expect(c3.clone(), BuildStatus::Failed).await;
        // A pre-submit failure says nothing about the branch.
        let pre = f
            .farm
            .trigger("b", None, None, &c3, BuildKind::PreSubmit, "test")
            .await
            .unwrap();
        assert_eq!(f.finished(pre).await.status, BuildStatus::Failed);
        git(&repo.path, &["rm", "-q", "broken"]);
        let c4 = repo.commit("fix it", &[("a.txt", "2\n")]);
        let fixed = expect(c4.clone(), BuildStatus::Passed).await;

        let hooks = chat.wait_until("two notices", Duration::from_secs(30), |r| r.len() >= 2);
        let start = std::time::Instant::now();
        while smtp.mails().len() < 2 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "mails: {:?}",
                smtp.mails()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Nothing more comes (c3 and the pre-submit build told nobody): the
        // outbox, once it has nothing left to send, holds one webhook and
        // one mail for each change, both sent.
        let start = std::time::Instant::now();
        let queued = loop {
            let rows = f.farm.store.outbox_for_repo("r", 100).await.unwrap();
            if rows.iter().all(|m| m.state != "pending") {
                break rows;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{rows:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let count = |kind: &str| {
            queued
                .iter()
                .filter(|m| m.kind == kind && m.state == "sent")
                .count()
        };
        assert_eq!(
            (count("webhook"), count("email"), queued.len()),
            (2, 2, 4),
            "{queued:?}"
        );
        let hooks_after = chat.all();
        assert_eq!(hooks_after.len(), 2, "{hooks_after:#?}");
        assert_eq!(smtp.mails().len(), 2, "{:?}", smtp.mails());

        let by_event = |e: &str| {
            hooks
                .iter()
                .find(|r| r.body["event"] == e)
                .unwrap_or_else(|| panic!("no {e} notice: {hooks:#?}"))
                .clone()
        };
        let b = by_event("broken");
        assert_eq!(b.method, "POST");
        assert_eq!(b.path, "/hooks/farm");
        assert_eq!(
            b.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert_eq!(b.body["commit"], c2.as_str());
        assert_eq!(b.body["branch"], "main");
        assert_eq!(b.body["builder"], "b");
        assert_eq!(
            b.body["url"],
            format!("https://farm.example.com/builds/{broke}")
        );
        assert_eq!(b.body["previous"]["state"], "passed");
        let g = by_event("fixed");
        assert_eq!(g.body["commit"], c4.as_str());
        assert_eq!(
            g.body["url"],
            format!("https://farm.example.com/builds/{fixed}")
        );

        let mails = smtp.mails();
        let red = mails
            .iter()
            .find(|m| m.contains("broke"))
            .unwrap_or_else(|| panic!("{mails:?}"));
        assert!(red.contains("To: team@example.com"), "{red}");
        assert!(red.contains("From: Farmer <farmer@example.com>"), "{red}");
        assert!(
            red.contains(&c2[..12]) && red.contains(&format!("/builds/{broke}")),
            "{red}"
        );
        let green = mails
            .iter()
            .find(|m| m.contains("green again"))
            .unwrap_or_else(|| panic!("{mails:?}"));
        assert!(green.contains(&c4[..12]), "{green}");
    });
}

/// Commit statuses wait in the store while the forge is down, survive a
/// coordinator restart, and are sent once it is back.
#[test]
fn statuses_survive_a_forge_outage_and_a_restart() {
    rt().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let mut repo = TestRepo::new(&tmp.path().join("work"));
        let head = repo.commit("one", &[("a.txt", "1\n")]);
        let api = crate::common::recorder::Recorder::start(0);
        api.set_failing(true);
        let mut f = InProc::start_with_secrets(
            &hooks_config(&repo.path, &api.url),
            &[("hook", HOOK_SECRET), ("gh", GH_TOKEN)],
        )
        .await;
        f.machine("host-a", "m1").await;
        let id = f
            .farm
            .trigger(
                "post",
                Some("app"),
                None,
                &head,
                BuildKind::PostSubmit,
                "test",
            )
            .await
            .unwrap();
        assert_eq!(f.finished(id).await.status, BuildStatus::Passed);
        api.wait_until(
            "an attempt while the forge is down",
            Duration::from_secs(20),
            |r| !r.is_empty(),
        );
        // The newest status has been tried, failed, and waits to be retried.
        let start = std::time::Instant::now();
        let pending = loop {
            let rows = f.farm.store.outbox_for_repo("app", 10).await.unwrap();
            if rows.iter().any(|m| m.state == "pending" && m.attempts >= 1) {
                break rows;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{rows:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            pending
                .iter()
                .any(|m| m.state == "pending" && m.last_error.contains("500")),
            "{pending:?}"
        );
        assert!(pending.iter().all(|m| !m.last_error.contains(GH_TOKEN)));

        f.restart().await;
        api.set_failing(false);
        let seen = api.wait_until(
            "the status after the restart",
            Duration::from_secs(30),
            |r| r.iter().any(|r| r.body["state"] == "success"),
        );
        let ok: Vec<_> = seen
            .iter()
            .filter(|r| r.body["state"] == "success")
            .collect();
        assert_eq!(ok.len(), 1, "{seen:#?}");
        assert_eq!(ok[0].path, format!("/repos/org/app/statuses/{head}"));
        assert_eq!(ok[0].body["context"], "farmer/post");
        // Recorded as sent once the answer is in.
        let start = std::time::Instant::now();
        loop {
            let after = f.farm.store.outbox_for_repo("app", 10).await.unwrap();
            if after.iter().any(|m| m.state == "sent") {
                assert!(after.iter().all(|m| m.state != "pending"), "{after:?}");
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{after:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}
