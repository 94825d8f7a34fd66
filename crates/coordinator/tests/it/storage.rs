//! The artifact store on both backends: files a build keeps, finished logs
//! and buildlet releases, in the data dir (the default) and in a real
//! S3-compatible server (moto, which scripts/test starts and names in
//! `FARMER_TEST_S3`; without one the S3 test fails and says so).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::common::{self, Bot, Coordinator, FARMER, TestRepo, config};

/// A builder whose step writes a known file, an empty-ish one, and names
/// a glob that matches nothing.
const BUILDER: &str = r#"
[builders.keep]
host = "host-test-trusted"
steps = [
  { name = "dist", run = "mkdir -p dist && seq 1 60000 > dist/app.bin && echo notes > dist/notes.txt && seq 1 500", artifacts = ["dist/*", "missing/*.zip"] },
]
"#;

/// What `seq 1 60000` prints: the content of `dist/app.bin`.
fn app_bin() -> Vec<u8> {
    (1..=60000)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes()
}

fn get_bytes(url: &str) -> Vec<u8> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "60", url])
        .output()
        .unwrap();
    assert!(out.status.success(), "GET {url} failed");
    out.stdout
}

/// Runs one build of `keep` and checks what it kept, through the API and
/// the page; returns the build's id.
fn build_and_check(c: &Coordinator, dir: &Path) -> i64 {
    let key = c.key("host-test-trusted");
    let _b = Bot::start(
        c,
        &dir.join("bots"),
        "host-test-trusted",
        "bot-1",
        Some(&key),
    );
    c.wait_connected(1);
    let builds = c.wait_builds_done(1, Duration::from_secs(60));
    let b = &builds[0];
    assert_eq!(b["status"], "passed", "{b}");
    let id = b["id"].as_i64().unwrap();

    let list = c.get(&format!("/api/builds/{id}/artifacts"));
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dist/app.bin", "dist/notes.txt"], "{list}");
    let want = app_bin();
    assert_eq!(list[0]["size"], want.len(), "{list}");
    assert_eq!(
        list[0]["sha256"],
        hex::encode(Sha256::digest(&want)),
        "{list}"
    );
    let got = get_bytes(&c.url(list[0]["url"].as_str().unwrap()));
    assert_eq!(got, want, "the downloaded file differs");
    assert_eq!(
        get_bytes(&c.url(&format!("/api/builds/{id}/artifacts/dist/notes.txt"))),
        b"notes\n"
    );
    // The build's detail and page list them; unknown names are 404.
    let detail = c.get(&format!("/api/builds/{id}"));
    assert_eq!(detail["artifacts"].as_array().unwrap().len(), 2, "{detail}");
    let page = c.get_text(&format!("/builds/{id}"));
    assert!(
        page.contains("Artifacts") && page.contains("dist/app.bin") && page.contains("KiB"),
        "{page}"
    );
    let missing = common::http(
        "GET",
        &c.url(&format!("/api/builds/{id}/artifacts/dist/nope")),
        &[],
        "",
    );
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert_eq!(
        common::http("GET", &c.url("/api/builds/999/artifacts"), &[], "").status,
        404
    );
    // The log says what was kept and what matched nothing; the finished
    // log is read back from where it was kept.
    let log = c.get_text(&format!("/api/builds/{id}/log"));
    assert!(
        log.contains("farmer: artifacts: kept dist/app.bin"),
        "{log}"
    );
    assert!(
        log.contains("farmer: artifacts \"missing/*.zip\": no file matched"),
        "{log}"
    );
    assert!(
        page.contains("kept dist/notes.txt"),
        "the step's log: {page}"
    );
    id
}

#[test]
fn files_a_step_keeps_are_listed_and_downloaded_whole_from_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("README", "x")]);
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, BUILDER)).unwrap();
    let data = dir.path().join("data");
    let c = Coordinator::start(&data, &cfg);
    build_and_check(&c, dir.path());
    // Kept under their SHA-256 in the data dir. The finished logs are there
    // too on SQLite; on PostgreSQL (whose standby could not read this data
    // dir) they stay in the rows.
    let blobs = std::fs::read_dir(data.join("artifacts/builds/sha256"))
        .unwrap()
        .count();
    assert_eq!(blobs, 2);
    let logs = data.join("artifacts/logs/steps");
    if common::postgres_server().is_none() {
        assert_eq!(std::fs::read_dir(&logs).unwrap().count(), 1);
    } else {
        assert!(!logs.exists());
    }
}

/// The S3 server of this run, and a bucket of its own made there.
fn bucket(name: &str) -> (String, String) {
    let endpoint = std::env::var("FARMER_TEST_S3").expect(
        "this test needs an S3-compatible server: run scripts/test (it starts moto and sets FARMER_TEST_S3)",
    );
    let bucket = format!("{name}-{}", std::process::id());
    let made = common::http("PUT", &format!("{endpoint}/{bucket}"), &[], "");
    assert_eq!(made.status, 200, "creating bucket {bucket}: {}", made.body);
    (endpoint, bucket)
}

/// Every key in `bucket` under `prefix` (moto answers unsigned listings).
fn keys(endpoint: &str, bucket: &str, prefix: &str) -> Vec<String> {
    let a = common::http(
        "GET",
        &format!("{endpoint}/{bucket}?list-type=2&prefix={prefix}&max-keys=1000"),
        &[],
        "",
    );
    assert_eq!(a.status, 200, "{}", a.body);
    a.body
        .split("<Key>")
        .skip(1)
        .filter_map(|k| k.split("</Key>").next())
        .map(str::to_string)
        .collect()
}

const AWS_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "farmer-test"),
    ("AWS_SECRET_ACCESS_KEY", "farmer-test-secret"),
];

#[test]
fn on_s3_kept_files_logs_and_releases_live_in_the_bucket() {
    let (endpoint, bucket) = bucket("farm");
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("README", "x")]);
    let cfg = dir.path().join("farm.toml");
    let storage = format!(
        "\n[storage]\nurl = \"s3://{bucket}/farm/a\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\n"
    );
    std::fs::write(&cfg, format!("{}{storage}", config(&repo.path, BUILDER))).unwrap();
    let data = dir.path().join("data");

    // A bucket that does not exist is found at start, and named.
    let wrong = dir.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        format!(
            "{}{}",
            config(&repo.path, BUILDER),
            storage.replace(&bucket, "no-such-bucket-here")
        ),
    )
    .unwrap();
    let out = common::output_within(
        Command::new(FARMER)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&wrong)
            .arg("--data-dir")
            .arg(dir.path().join("data-wrong"))
            .envs(AWS_ENV.iter().copied()),
        Duration::from_secs(120),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("checking the artifact store") && err.contains("no-such-bucket-here"),
        "{err}"
    );

    let c = Coordinator::start_env(&data, &cfg, &[], AWS_ENV);
    assert!(
        c.err.wait_for("S3 bucket", Duration::from_secs(5)),
        "{}",
        c.err.all()
    );
    build_and_check(&c, dir.path());
    let stored = keys(&endpoint, &bucket, "farm/a/");
    let count = |p: &str| stored.iter().filter(|k| k.starts_with(p)).count();
    assert_eq!(count("farm/a/builds/sha256/"), 2, "{stored:?}");
    assert_eq!(count("farm/a/logs/steps/"), 1, "{stored:?}");
    assert_eq!(count("farm/a/logs/attempts/"), 1, "{stored:?}");
    assert!(
        !data.join("artifacts/logs").exists() && !data.join("artifacts/builds").exists(),
        "nothing of it in the data dir"
    );

    // A release published with this config goes to the bucket, and the
    // coordinator serves it from there.
    let release = dir.path().join("buildlet-s3");
    let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&release, &blob).unwrap();
    let p = stage0::Platform::current();
    let out = Command::new(FARMER)
        .args(["buildlet", "publish", "--os", &p.os, "--arch", &p.arch])
        .arg(&release)
        .arg("--data-dir")
        .arg(&data)
        .arg("--config")
        .arg(&cfg)
        .args(["--protocol", &buildlet::proto::VERSION.to_string()])
        .args(["--version", "s3-1"])
        .envs(AWS_ENV.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("S3 bucket"), "{stdout}");
    assert!(
        keys(&endpoint, &bucket, "farm/a/stage0/").len() >= 2,
        "{:?}",
        keys(&endpoint, &bucket, "farm/a/")
    );
    let url = c.url(&format!("/stage0/buildlet?os={}&arch={}", p.os, p.arch));
    let got = c.wait("the release to be served", Duration::from_secs(30), |_| {
        let out = Command::new("curl").args(["-sf", &url]).output().unwrap();
        (out.status.success() && out.stdout.len() == blob.len()).then_some(out.stdout)
    });
    assert!(
        got == blob,
        "the served release differs from the published one"
    );
}

#[test]
fn storage_settings_are_checked_with_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let repo = TestRepo::new(&dir.path().join("repo"));
    for (storage, want) in [
        ("url = \"gs://bucket/x\"", "s3://BUCKET/PREFIX"),
        ("url = \"s3://Bad_Bucket\"", "not a bucket name"),
        (
            "url = \"s3://farm\"\nendpoint = \"ftp://x\"",
            "http:// or https://",
        ),
        ("endpoint = \"http://x\"", "needs url"),
        ("url = \"s3://farm\"\nbucket = \"x\"", "unknown key"),
    ] {
        let cfg = dir.path().join("farm.toml");
        std::fs::write(
            &cfg,
            format!("{}\n[storage]\n{storage}\n", config(&repo.path, "")),
        )
        .unwrap();
        let out = Command::new(FARMER)
            .arg("check-config")
            .arg(&cfg)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{storage}: {text}");
        assert!(text.contains(want), "{storage}: wanted {want:?} in {text}");
    }
}
