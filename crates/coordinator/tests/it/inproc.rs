//! The lease queue, the pool and builds, tested in process (see
//! `common/inproc.rs`): the real farm and the real buildlet handler joined
//! by a pipe. Each test takes milliseconds.

use crate::common::TestRepo;
use crate::common::inproc::{InProc, Quirk, config, rt};

use std::time::Duration;

use coordinator::pool::{Holder, MachineState};
use coordinator::scheduler::{LeaseRequest, Priority};
use coordinator::store::{BuildKind, BuildStatus, RunResult};

const BUILDER: &str = r#"
[builders.b]
host = "host-a"
[[builders.b.steps]]
name = "say"
run = "echo built $FARMER_COMMIT; cat file"
"#;

#[test]
fn a_build_runs_on_a_real_buildlet_handler_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let commit = repo.commit("one", &[("file", "contents of the tree\n")]);
    rt().block_on(async {
        let f = InProc::start(&config(&repo.path, BUILDER)).await;
        f.machine("host-a", "m1").await;
        let id = f
            .farm
            .trigger("b", None, None, &commit, BuildKind::PostSubmit, "test")
            .await
            .unwrap();
        let b = f.finished(id).await;
        assert_eq!(b.status, BuildStatus::Passed, "{b:?}");
        let log = f.step_log(id, 0).await;
        assert!(log.contains(&format!("built {commit}")), "{log}");
        assert!(log.contains("contents of the tree"), "{log}");
        // The machine is cleaned and idle again.
        until_idle(&f, "the machine idle").await;
    });
}

#[test]
fn the_lease_queue_serves_release_interactive_presubmit_then_newest_postsubmit() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let old = repo.commit("old", &[("file", "1\n")]);
    let new = repo.commit("new", &[("file", "2\n")]);
    let builders = BUILDER.replace(
        "host = \"host-a\"\n",
        "host = \"host-a\"\npresubmit = true\n",
    );
    rt().block_on(async {
        let f = InProc::start(&config(&repo.path, &builders)).await;
        let mut ids = Vec::new();
        for (commit, kind) in [
            (&old, BuildKind::PostSubmit),
            (&new, BuildKind::PostSubmit),
            (&old, BuildKind::PreSubmit),
            (&old, BuildKind::Interactive),
            (&old, BuildKind::Release),
        ] {
            ids.push(
                f.farm
                    .trigger("b", None, None, commit, kind, "test")
                    .await
                    .unwrap(),
            );
        }
        // Everything waits: nothing to run on, and the queue says so.
        let q = f.farm.scheduler.views(0);
        assert_eq!(q[0].waiting, 5);
        assert!(
            f.farm
                .wait_reason("host-a")
                .contains("no machine of host-a"),
            "{}",
            f.farm.wait_reason("host-a")
        );
        // One machine: the builds run one after another, most urgent first.
        f.machine("host-a", "only").await;
        let mut order = Vec::new();
        for id in &ids {
            let b = f.finished(*id).await;
            assert_eq!(b.status, BuildStatus::Passed, "{b:?}");
            let a = f.farm.store.attempts(*id).await.unwrap();
            order.push((a[0].id, *id));
        }
        order.sort();
        let ran: Vec<i64> = order.iter().map(|(_, id)| *id).collect();
        // release, interactive, pre-submit, post-submit of the newer commit, then the older.
        assert_eq!(ran, vec![ids[4], ids[3], ids[2], ids[1], ids[0]]);
    });
}

#[test]
fn withdrawn_requests_take_no_machine_and_a_lease_nobody_reads_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let commit = repo.commit("one", &[("file", "x\n")]);
    rt().block_on(async {
        let f = InProc::start(&config(&repo.path, BUILDER)).await;
        // A build cancelled while it waits never runs.
        let cancelled = f
            .farm
            .trigger("b", None, None, &commit, BuildKind::Interactive, "test")
            .await
            .unwrap();
        let kept = f
            .farm
            .trigger("b", None, None, &commit, BuildKind::Release, "test")
            .await
            .unwrap();
        assert_eq!(
            f.farm.cancel(cancelled).await.unwrap(),
            BuildStatus::Cancelled
        );
        assert_eq!(f.farm.scheduler.waiting("host-a"), 1);
        // An interactive request whose asker goes away before a machine
        // comes: withdrawn, nothing leased for it.
        let gone = f.farm.scheduler.request(LeaseRequest {
            host_type: "host-a".into(),
            priority: Priority::Interactive,
            holder: Holder::Interactive {
                session: "s-gone".into(),
            },
            commit_time: 0,
        });
        drop(gone);
        assert_eq!(f.farm.scheduler.waiting("host-a"), 1);
        f.machine("host-a", "m").await;
        assert_eq!(f.finished(kept).await.status, BuildStatus::Passed);
        assert!(f.farm.store.attempts(cancelled).await.unwrap().is_empty());
        f.until("the machine idle", Duration::from_secs(10), || {
            f.farm
                .pool
                .find("host-a", "m")
                .is_some_and(|m| m.state == MachineState::Idle)
        })
        .await;

        // A session gets the machine, and its state says who holds it.
        let mut ticket = f.farm.scheduler.request(LeaseRequest {
            host_type: "host-a".into(),
            priority: Priority::Interactive,
            holder: Holder::Interactive {
                session: "s1".into(),
            },
            commit_time: 0,
        });
        let lease = tokio::time::timeout(Duration::from_secs(10), ticket.lease())
            .await
            .unwrap()
            .unwrap();
        let m = f.farm.pool.find("host-a", "m").unwrap();
        assert_eq!(
            m.state,
            MachineState::Leased {
                holder: Holder::Interactive {
                    session: "s1".into()
                }
            }
        );
        // Ending the lease cleans the machine and makes it idle again.
        f.farm.end_lease(lease).await;
        assert_eq!(
            f.farm.pool.find("host-a", "m").unwrap().state,
            MachineState::Idle
        );

        // A lease handed to a ticket nobody reads goes back to the pool.
        let unread = f.farm.scheduler.request(LeaseRequest {
            host_type: "host-a".into(),
            priority: Priority::Interactive,
            holder: Holder::Interactive {
                session: "s2".into(),
            },
            commit_time: 0,
        });
        f.until("the lease handed over", Duration::from_secs(10), || {
            f.farm.scheduler.waiting("host-a") == 0
        })
        .await;
        drop(unread);
        assert_eq!(
            f.farm.pool.find("host-a", "m").unwrap().state,
            MachineState::Idle
        );
    });
}

/// `POST /api/builds` as the README writes it: a JSON body, with or
/// without `Content-Type: application/json` (curl -d sends a form type).
#[test]
fn a_build_is_requested_with_a_json_body_whatever_its_content_type() {
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("file", "x\n")]);
    rt().block_on(async {
        let f = InProc::start(&config(&repo.path, BUILDER)).await;
        let post = |ty: &'static str, body: &'static str| {
            let app = coordinator::api::router(f.farm.clone());
            async move {
                let r = app
                    .oneshot(
                        axum::http::Request::post("/api/builds")
                            .header("authorization", "Bearer test-admin-token")
                            .header("content-type", ty)
                            .body(axum::body::Body::from(body))
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
        };
        let body = r#"{"builder": "b", "commit": "main"}"#;
        for ty in [
            "application/json",
            "application/x-www-form-urlencoded",
            "text/plain",
        ] {
            let (status, answer) = post(ty, body).await;
            assert_eq!(status, 201, "{ty}: {answer}");
        }
        let (status, answer) = post("application/json", "builder=b").await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer.contains("not the JSON expected"), "{answer}");
    });
}

/// A repo's `backfill`: how much of a branch's existing history its first
/// poll builds; 0 records where the farm started and builds only what
/// comes later.
#[test]
fn backfill_bounds_the_history_a_first_poll_builds() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    for i in 0..5 {
        repo.commit(&format!("c{i}"), &[("file", &format!("{i}\n"))]);
    }
    for (backfill, commits, builds) in [(2, 2, 2), (0, 1, 0)] {
        let cfg = config(&repo.path, BUILDER).replace(
            "branches = [\"main\"]\n",
            &format!("branches = [\"main\"]\nbackfill = {backfill}\n"),
        );
        rt().block_on(async {
            let f = InProc::start(&cfg).await;
            let queued = coordinator::poller::poll_once(&f.farm, "r").await.unwrap();
            assert_eq!(queued, builds, "backfill = {backfill}");
            let known = f.farm.store.known_commits("r", "main").await.unwrap();
            assert_eq!(known.len(), commits, "backfill = {backfill}");
            // A commit that comes later is built either way.
            let next = repo.commit("later", &[("file", &format!("later {backfill}\n"))]);
            let queued = coordinator::poller::poll_once(&f.farm, "r").await.unwrap();
            assert_eq!(queued, 1, "backfill = {backfill}");
            let b = f.farm.store.builds(&Default::default()).await.unwrap();
            assert!(b.iter().any(|b| b.commit == next), "{b:?}");
        });
    }
}

/// Waits up to 10 s for the machine `m1` of `host-a` to be idle.
async fn until_idle(f: &InProc, what: &str) {
    f.until(what, Duration::from_secs(10), || {
        f.farm
            .pool
            .find("host-a", "m1")
            .is_some_and(|m| m.state == MachineState::Idle)
    })
    .await;
}

/// [`config`] with links parking after a second idle.
fn parking_config(repo: &std::path::Path) -> String {
    config(repo, BUILDER).replace("[farm]\n", "[farm]\npark_after = \"1s\"\n")
}

/// Builds `commit` with the builder `b`; asserts it passed and returns its
/// step's log.
async fn passing_build(f: &InProc, commit: &str) -> String {
    let id = f
        .farm
        .trigger("b", None, None, commit, BuildKind::PostSubmit, "test")
        .await
        .unwrap();
    let b = f.finished(id).await;
    assert_eq!(b.status, BuildStatus::Passed, "{b:?}");
    f.step_log(id, 0).await
}

/// Whether the one machine of `host-a` has its link parked.
fn parked(f: &InProc) -> bool {
    f.farm
        .pool
        .counts()
        .get("host-a")
        .is_some_and(|c| c.parked == 1)
}

#[test]
fn an_idle_link_parks_and_wakes_for_each_build() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let cfg = parking_config(&repo.path);
    rt().block_on(async {
        let f = InProc::start(&cfg).await;
        f.machine("host-a", "m1").await;
        for round in 0..3 {
            f.until("the idle link parked", Duration::from_secs(15), || {
                parked(&f)
            })
            .await;
            // Parked across heartbeats: its pings are answered, it stays.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert!(parked(&f), "round {round}: the link left its parked state");
            let commit = repo.commit(
                &format!("c{round}"),
                &[("file", &format!("round {round}\n"))],
            );
            let log = passing_build(&f, &commit).await;
            assert!(log.contains(&format!("round {round}")), "{log}");
            // The same connection served it: the machine never left.
            assert_eq!(f.farm.pool.snapshot().len(), 1);
        }
    });
}

#[test]
fn a_parked_link_that_stops_answering_or_speaks_out_of_turn_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let repo = TestRepo::new(&dir.path().join("repo"));
    let cfg = config(&repo.path, BUILDER).replace(
        "heartbeat_timeout = \"30s\"\n",
        "heartbeat_timeout = \"3s\"\npark_after = \"1s\"\n",
    );
    rt().block_on(async {
        let f = InProc::start(&cfg).await;
        let (_b1, silent) = f.tapped_machine("host-a", "silent").await;
        let (_b2, chatty) = f.tapped_machine("host-a", "chatty").await;
        let both_parked = || {
            f.farm
                .pool
                .counts()
                .get("host-a")
                .is_some_and(|c| c.parked == 2)
        };
        f.until("both links parked", Duration::from_secs(15), both_parked)
            .await;
        // A machine that stops answering pings goes within the timeout.
        silent.mute.store(true, std::sync::atomic::Ordering::SeqCst);
        // One that sends anything but answers to pings goes at once.
        chatty.inject.send(b"HTTP/1.1 200 OK\r\n".to_vec()).unwrap();
        f.until("the chatty machine dropped", Duration::from_secs(2), || {
            f.farm.pool.find("host-a", "chatty").is_none()
        })
        .await;
        assert!(
            f.farm.pool.find("host-a", "silent").is_some(),
            "the silent machine went before its heartbeat timeout"
        );
        f.until(
            "the silent machine dropped",
            Duration::from_secs(10),
            || f.farm.pool.find("host-a", "silent").is_none(),
        )
        .await;
    });
}

#[test]
fn a_link_does_not_park_under_an_answer_still_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let repo = TestRepo::new(&dir.path().join("repo"));
    let cfg = parking_config(&repo.path);
    rt().block_on(async {
        let f = InProc::start(&cfg).await;
        f.machine("host-a", "m1").await;
        let id = f.farm.pool.find("host-a", "m1").unwrap().id;
        let client = f.farm.pool.client(id).unwrap();
        // The machine is idle in the pool while a command's output streams
        // past park_after (as a gomote stream can outlive its lease).
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stream = {
            let (client, done) = (client.clone(), done.clone());
            tokio::spawn(async move {
                let opts = buildlet::client::ExecOptions {
                    args: vec!["-c".into(), "echo start; sleep 4; echo end".into()],
                    ..Default::default()
                };
                let r = client.exec_output("/bin/sh", &opts).await;
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                r
            })
        };
        // Idle past park_after and two of the link's checks (every 250 ms).
        f.until("the machine idle 1.5 s", Duration::from_secs(10), || {
            f.farm
                .pool
                .idle_for(id)
                .is_some_and(|d| d >= Duration::from_millis(1500))
        })
        .await;
        // The session is still there: another request is answered while
        // the stream runs, not after a park that waited for it.
        client.status().await.unwrap();
        assert!(
            !done.load(std::sync::atomic::Ordering::SeqCst),
            "the status answer waited for the stream"
        );
        let (st, out) = stream.await.unwrap().unwrap();
        assert!(st.success(), "{st:?}");
        assert_eq!(String::from_utf8_lossy(&out), "start\nend\n");
        // Once the answer is read, the link parks.
        f.until("the link parked", Duration::from_secs(15), || parked(&f))
            .await;
    });
}

#[test]
fn a_protocol_1_machine_keeps_its_session_and_builds() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let cfg = parking_config(&repo.path);
    rt().block_on(async {
        let f = InProc::start(&cfg).await;
        f.protocol_1_machine("host-a", "old").await;
        let m = f.farm.pool.find("host-a", "old").unwrap();
        assert_eq!(m.version, 1);
        // Well past park_after, and across heartbeats: never parked (it
        // could not), still there, and it builds.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(!parked(&f), "a protocol 1 link was parked");
        }
        assert_eq!(f.farm.pool.find("host-a", "old").map(|m| m.id), Some(m.id));
        let commit = repo.commit("old", &[("file", "for the old one\n")]);
        assert!(passing_build(&f, &commit).await.contains("for the old one"));
    });
}

/// The paths a recorded machine was asked for, `/status` left out.
fn asked(seen: &std::sync::Mutex<Vec<String>>) -> Vec<String> {
    let seen = seen.lock().unwrap();
    seen.iter().filter(|p| *p != "/status").cloned().collect()
}

/// What is left in a machine's work dir, sorted.
fn left_in(b: &buildlet::server::Buildlet) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(b.workdir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

/// A build's last command also empties the machine's work dir, in the
/// same request (`clean=1`): a build costs the machine two requests, the
/// source and the command, not three. The machine is idle and empty
/// after it, and its source cache still holds the tree.
#[test]
fn a_builds_last_command_cleans_the_machine_in_the_same_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let commit = repo.commit("one", &[("file", "contents\n")]);
    let builders = BUILDER.replace(
        "echo built $FARMER_COMMIT; cat file",
        "echo built $FARMER_COMMIT; cat file; echo out > ../made; mkdir -p ../d; echo x > ../d/f",
    );
    rt().block_on(async {
        let f = InProc::start(&config(&repo.path, &builders)).await;
        let (b, seen) = f.recorded_machine("host-a", "m1", Quirk::None).await;
        let log = passing_build(&f, &commit).await;
        assert!(log.contains("contents"), "{log}");
        until_idle(&f, "the machine idle").await;
        assert_eq!(asked(&seen), ["/writesrc", "/exec"]);
        assert_eq!(left_in(&b), ["tmp"]);
        assert!(b.status().src_tree.is_some(), "the tree left the cache");
        // The next build on it gets its source from the cache as usual.
        let log = passing_build(&f, &commit).await;
        assert!(log.contains("contents"), "{log}");
    });
}

/// A machine whose buildlet predates `clean=1` runs the last command
/// alone, and the coordinator empties its work dir with `/removeall`, as
/// before.
#[test]
fn a_machine_that_predates_cleaning_with_the_command_is_cleaned_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let commit = repo.commit("one", &[("file", "contents\n")]);
    let builders = BUILDER.replace("cat file", "cat file; echo out > ../made");
    rt().block_on(async {
        let f = InProc::start(&config(&repo.path, &builders)).await;
        let (b, seen) = f
            .recorded_machine("host-a", "m1", Quirk::PredatesClean)
            .await;
        passing_build(&f, &commit).await;
        until_idle(&f, "the machine cleaned and idle").await;
        assert_eq!(asked(&seen), ["/writesrc", "/exec", "/removeall"]);
        assert_eq!(left_in(&b), ["tmp"]);
    });
}

/// A machine that never ends a command's answer (it answers pings, says
/// the command runs, and then nothing) holds the build only until the
/// step's timeout plus the grace a buildlet has after it: the attempt ends
/// as the machine's failure, the machine leaves the pool, and the build
/// passes on another machine.
#[test]
fn a_machine_that_never_ends_a_command_is_dropped_and_the_build_runs_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let commit = repo.commit("one", &[("file", "contents\n")]);
    // Two steps: the first is not the last, so no cleaning is added to
    // its grace.
    let builders = format!(
        "{BUILDER}timeout = \"1s\"\n[[builders.b.steps]]\nname = \"again\"\nrun = \"cat file\"\n"
    );
    rt().block_on(async {
        let f = InProc::start(&config(&repo.path, &builders)).await;
        let (_, seen) = f
            .recorded_machine("host-a", "m1", Quirk::ExecNeverEnds)
            .await;
        let id = f
            .farm
            .trigger("b", None, None, &commit, BuildKind::PostSubmit, "test")
            .await
            .unwrap();
        f.until("the build on m1", Duration::from_secs(10), || {
            asked(&seen).contains(&"/exec".to_string())
        })
        .await;
        f.machine("host-a", "m2").await;
        let b = f.finished_within(id, Duration::from_secs(90)).await;
        assert_eq!(b.status, BuildStatus::Passed, "{b:?}");
        let attempts = f.farm.store.attempts(id).await.unwrap();
        assert_eq!(attempts.len(), 2, "{attempts:?}");
        assert_eq!(attempts[0].machine, "m1");
        assert_eq!(attempts[0].result, RunResult::InfraError, "{attempts:?}");
        assert!(
            attempts[0].error.contains("did not end the command within"),
            "{attempts:?}"
        );
        assert_eq!(attempts[1].machine, "m2");
        assert!(f.farm.pool.find("host-a", "m1").is_none());
    });
}
