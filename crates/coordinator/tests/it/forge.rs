//! Living with a forge: `https://` remotes through a real smart-HTTP git
//! server over TLS (nginx, fcgiwrap, git http-backend), webhooks signed as
//! the forges sign them, commit statuses and notifications sent to local
//! servers that check every request.

use crate::common::gitserver::GitServer;
use crate::common::inproc::{InProc, rt};
use crate::common::{TestRepo, git};

use std::time::Duration;

use coordinator::poller::poll_once;
use coordinator::store::BuildStatus;

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
        let _ = git;
        let _ = Duration::ZERO;
    });
}
