//! gomote end to end: real `farmer serve`, real reverse buildlets, the real
//! `farmer gomote` / `farmer user` CLI as processes, each user with their
//! own config dir.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{Bot, Coordinator, FARMER, Reaped, SSH_QUIET, TestRepo, output_within};

const LIMIT: Duration = Duration::from_secs(60);

/// The farm: `slow` builds wait (boundedly) for the file `gate` to exist,
/// so the test decides when the first build frees its machine.
fn config(repo: &Path, gate: &Path) -> String {
    format!(
        r#"[farm]
heartbeat = "1s"
heartbeat_timeout = "30s"
gomote_idle_timeout = "10s"
gomote_max_instances = 2

[repos.r]
url = "{}"
branches = ["main"]
poll_interval = "300ms"

[hosts.host-test-trusted]
pool = "reverse"
expected = 2
trusted = true
gomote = true

[hosts.host-test-closed]
pool = "reverse"
expected = 0

[builders.slow]
host = "host-test-trusted"
steps = [{{ name = "gate", run = "for i in $(seq 600); do [ -f {gate} ] && exit 0; sleep 0.1; done; exit 1" }}]
"#,
        repo.display(),
        gate = gate.display()
    )
}

/// A user of the farm: a config dir of their own.
struct User {
    home: PathBuf,
}

impl User {
    fn new(dir: &Path, name: &str) -> User {
        let home = dir.join(format!("home-{name}"));
        std::fs::create_dir_all(&home).unwrap();
        User { home }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(FARMER);
        c.arg("gomote")
            .args(args)
            .env("XDG_CONFIG_HOME", &self.home)
            .env("HOME", &self.home)
            .env_remove("GOMOTE_GROUP")
            .env_remove("FARMER_TOKEN")
            .env_remove("FARMER_COORDINATOR");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        output_within(&mut self.cmd(args), LIMIT)
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "gomote {args:?} failed ({:?}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs and expects failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(!o.status.success(), "gomote {args:?} should have failed");
        String::from_utf8_lossy(&o.stderr).into_owned()
    }
}

fn farmer(args: &[&str]) -> String {
    let o = output_within(Command::new(FARMER).args(args), LIMIT);
    assert!(
        o.status.success(),
        "farmer {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Adds a user and logs them in.
fn add_user(c: &Coordinator, dir: &Path, name: &str) -> User {
    let dd = c.data_dir.to_str().unwrap();
    let url = format!("http://{}", c.addr);
    let token = farmer(&["user", "add", name, "--coordinator", &url, "--data-dir", dd]);
    let tf = dir.join(format!("{name}.token"));
    std::fs::write(&tf, token.trim()).unwrap();
    let u = User::new(dir, name);
    let out = u.ok(&[
        "login",
        "--coordinator",
        &url,
        "--token-file",
        tf.to_str().unwrap(),
    ]);
    assert!(out.contains(&format!("as {name}")), "{out}");
    u
}

fn builds(c: &Coordinator) -> Vec<serde_json::Value> {
    c.get("/api/builds?limit=100").as_array().unwrap().clone()
}

fn instance(u: &User, name: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&u.ok(&["list", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not listed: {v}"))
}

#[test]
fn gomote_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("first", &[("README", "hi\n")]);
    let cfg = dir.path().join("farm.toml");
    let gate = dir.path().join("go");
    std::fs::write(&cfg, config(&repo.path, &gate)).unwrap();
    let data = dir.path().join("data");
    let c = Coordinator::start_args(&data, &cfg, &["--ssh-listen", "127.0.0.1:0"]);
    let bots = dir.path().join("bots");
    let key = c.key("host-test-trusted");
    let bot_a = Bot::start(&c, &bots, "host-test-trusted", "bot-a", Some(&key));

    // Users and login: the token is kept 0600 in the user's config dir.
    let alice = add_user(&c, dir.path(), "alice");
    let bob = add_user(&c, dir.path(), "bob");
    let conf = alice.home.join("farmer/gomote.toml");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&conf).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", conf.display());
    }
    let listed = farmer(&[
        "user",
        "list",
        "--coordinator",
        &format!("http://{}", c.addr),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(
        listed.contains("alice") && listed.contains("bob"),
        "{listed}"
    );
    // A wrong token is refused with a sentence, before anything else.
    let stranger = User::new(dir.path(), "stranger");
    let mut cmd = stranger.cmd(&["list"]);
    cmd.env("FARMER_COORDINATOR", format!("http://{}", c.addr))
        .env("FARMER_TOKEN", "fgu_nope");
    let o = output_within(&mut cmd, LIMIT);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("belongs to no user"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The queue: the head commit's build holds the only machine (until
    // the gate opens); the instance waits behind it, ahead of the
    // post-submit build queued meanwhile, and gets the machine first.
    c.wait("the first build running", LIMIT, |c| {
        builds(c)
            .iter()
            .any(|b| b["status"] == "running")
            .then_some(())
    });
    let mut create = Reaped(
        alice
            .cmd(&["create", "slow"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let err = crate::common::Lines::follow(create.0.stderr.take().unwrap());
    let out = crate::common::Lines::follow(create.0.stdout.take().unwrap());
    assert!(
        err.wait_for("place 1 of 1", LIMIT),
        "create printed no place in the queue: {}\nstdout: {}\ncoordinator: {}",
        err.all(),
        out.all(),
        c.err.all()
    );
    repo.commit("second", &[("README", "two\n")]);
    let q = c.wait("two waiting requests", LIMIT, |c| {
        let q = c.get("/api/queue");
        let first = q.as_array()?.first()?.clone();
        (first["waiting"] == 2).then_some(first)
    });
    let reqs = q["requests"].as_array().unwrap();
    assert_eq!(reqs[0]["holder"], "interactive", "{q}");
    assert_eq!(reqs[1]["holder"], "build", "{q}");
    assert!(
        !out.all().contains("alice-slow-1"),
        "ready while the build ran"
    );
    std::fs::write(&gate, "").unwrap();
    assert!(out.wait_for("alice-slow-1", LIMIT), "{}", err.all());
    let inst = "alice-slow-1";
    let queued: Vec<_> = builds(&c)
        .into_iter()
        .filter(|b| b["status"] == "queued")
        .collect();
    assert_eq!(
        queued.len(),
        1,
        "the post-submit build waits behind the instance"
    );
    let v = instance(&alice, inst);
    assert_eq!(v["state"], "ready");
    assert_eq!(v["hostname"], "bot-a");
    // The pages say who holds the machine until when.
    let status = c.get_text("/status");
    assert!(status.contains("leased to alice until"), "{status}");

    // Files: put, ls, get, puttar, gettar, rm — content checked.
    let local = dir.path().join("hello.txt");
    std::fs::write(&local, "hello gomote\n").unwrap();
    alice.ok(&[
        "put",
        "-mode",
        "0755",
        inst,
        local.to_str().unwrap(),
        "sub/hello.txt",
    ]);
    let ls = alice.ok(&["ls", "-R", "-d", inst, "sub"]);
    assert!(ls.contains("hello.txt") && ls.contains("755"), "{ls}");
    let back = dir.path().join("back.txt");
    alice.ok(&["get", inst, "sub/hello.txt", back.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "hello gomote\n");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("a")).unwrap();
    std::fs::write(tree.join("a/one"), "1").unwrap();
    let tgz = dir.path().join("t.tgz");
    let st = Command::new("tar")
        .arg("czf")
        .arg(&tgz)
        .arg("-C")
        .arg(&tree)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    alice.ok(&["puttar", "-dir", "unpacked", inst, tgz.to_str().unwrap()]);
    let out_tgz = dir.path().join("out.tgz");
    let mut g = alice.cmd(&["gettar", "-dir", "unpacked", inst]);
    g.stdout(std::fs::File::create(&out_tgz).unwrap())
        .stderr(Stdio::null());
    let mut child = Reaped(g.spawn().unwrap());
    let deadline = Instant::now() + LIMIT;
    let st = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "gettar hung");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "gettar failed");
    let listing = Command::new("tar")
        .arg("tzf")
        .arg(&out_tgz)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listing.stdout).contains("a/one"),
        "{}",
        String::from_utf8_lossy(&listing.stdout)
    );
    alice.ok(&["rm", inst, "unpacked"]);
    let top = alice.ok(&["ls", inst]);
    assert!(top.contains("sub") && !top.contains("unpacked"), "{top}");
    // Escapes are refused as the buildlet refuses them; nothing is written.
    let e = alice.fails(&["put", inst, local.to_str().unwrap(), "../escaped.txt"]);
    assert!(e.contains("escape"), "{e}");
    assert!(!bot_a.workdir.parent().unwrap().join("escaped.txt").exists());

    // run: output streams, the remote exit status becomes ours.
    let o = alice.run(&[
        "run",
        "-system",
        "-e",
        "X=1",
        inst,
        "sh",
        "-c",
        "echo out-$X; exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stdout).contains("out-1"));
    // -until runs the command again until its output matches: here the
    // third run.
    let counter = "n=$(( $(cat cnt 2>/dev/null || echo 0) + 1 )); echo $n > cnt; echo ok-$n";
    let o = alice.run(&[
        "run", "-system", "-until", "ok-3", inst, "sh", "-c", counter,
    ]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok-3"));
    let again = String::from_utf8_lossy(&o.stderr)
        .matches("did not match -until yet")
        .count();
    assert_eq!(again, 2, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        alice.ok(&["run", "-system", inst, "cat", "cnt"]).trim(),
        "3"
    );

    // push: only what changed travels; what was deleted goes.
    let src = dir.path().join("src");
    for i in 0..300 {
        let d = src.join(format!("d{}", i % 10));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join(format!("f{i}")),
            format!("file {i} {}\n", "x".repeat(200)),
        )
        .unwrap();
    }
    let before = instance(&alice, inst)["bytes_received"].as_u64().unwrap();
    let s = alice.ok(&["push", inst, src.to_str().unwrap()]);
    assert!(s.contains("pushed 300 changed files"), "{s}");
    let mid = instance(&alice, inst)["bytes_received"].as_u64().unwrap();
    std::fs::write(src.join("d3/f3"), "changed\n").unwrap();
    std::fs::remove_file(src.join("d4/f4")).unwrap();
    let s = alice.ok(&["push", inst, src.to_str().unwrap()]);
    assert!(
        s.contains("pushed 1 changed files") && s.contains("removed 1"),
        "{s}"
    );
    let after = instance(&alice, inst)["bytes_received"].as_u64().unwrap();
    let full = mid - before;
    let incremental = after - mid;
    assert!(
        incremental * 10 < full,
        "the second push sent {incremental} bytes, the first {full}"
    );
    let out = alice.ok(&["run", "-system", inst, "cat", "src/d3/f3"]);
    assert_eq!(out.trim(), "changed");
    assert!(!alice.ok(&["ls", "-R", inst, "src"]).contains("f4\n"));

    // Access: bob sees nothing of alice's and may not touch it.
    assert!(!bob.ok(&["list"]).contains(inst));
    let e = bob.fails(&["run", inst, "true"]);
    assert!(e.contains("not yours"), "{e}");
    assert!(!e.contains("bot-a"), "{e}");
    // A host type whose owner said no.
    let e = alice.fails(&["create", "host-test-closed"]);
    assert!(e.contains("gomote = false"), "{e}");
    // The proxy passes only file and command calls (alice's own token:
    // the refusal is the allow-list's, not an ownership one).
    let alice_token = std::fs::read_to_string(dir.path().join("alice.token")).unwrap();
    let bearer = format!("Bearer {}", alice_token.trim());
    let proxied = |method: &str, call: &str| {
        crate::common::http(
            method,
            &c.url(&format!("/api/gomote/instances/{inst}/buildlet/{call}")),
            &[("authorization", &bearer)],
            "",
        )
    };
    let a = proxied("POST", "halt");
    assert_eq!(a.status, 404, "{}", a.body);
    assert!(a.body.contains("is not a gomote call"), "{}", a.body);
    let a = proxied("GET", "machine-token");
    assert_eq!(a.status, 404, "{}", a.body);
    assert_eq!(proxied("GET", "status").status, 200);

    // A second machine, a group, and a broadcast.
    let _bot_b = Bot::start(&c, &bots, "host-test-trusted", "bot-b", Some(&key));
    alice.ok(&["group", "create", "g"]);
    let second = alice.ok(&["create", "-group", "g", "host-test-trusted"]);
    let second = second.trim();
    assert_eq!(second, "alice-test-trusted-1");
    alice.ok(&["group", "add", "g", inst]);
    // The cap per user.
    let e = alice.fails(&["create", "--no-wait", "slow"]);
    assert!(e.contains("most per user is 2"), "{e}");
    let mut bc = alice.cmd(&["run", "-system", "sh", "-c", "echo hi-from-group"]);
    bc.env("GOMOTE_GROUP", "g");
    let o = output_within(&mut bc, LIMIT);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(&format!("{inst}: hi-from-group"))
            && text.contains(&format!("{second}: hi-from-group")),
        "{text}"
    );

    // The shell: real OpenSSH over the machine's own link, the owner's
    // keys only.
    let port = c
        .out
        .all()
        .split("ssh -p ")
        .nth(1)
        .expect("the banner names the SSH port")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    crate::ssh::keygen(&dir.path().join("akey"));
    crate::ssh::keygen(&dir.path().join("bkey"));
    let dd = data.to_str().unwrap();
    let url = format!("http://{}", c.addr);
    for (user, key) in [("alice", "akey.pub"), ("bob", "bkey.pub")] {
        let out = farmer(&[
            "user",
            "add-key",
            user,
            dir.path().join(key).to_str().unwrap(),
            "--coordinator",
            &url,
            "--data-dir",
            dd,
        ]);
        assert!(out.contains("SHA256:"), "{out}");
    }
    let ssh = |key: &str, extra: &[&str]| {
        let mut cmd = Command::new("ssh");
        cmd.args(["-p", &port, "-i"])
            .arg(dir.path().join(key))
            .args(SSH_QUIET)
            .args(extra)
            .env("TERM", "xterm-256color");
        cmd
    };
    let mut tt = ssh(
        "akey",
        &[
            "-tt",
            &format!("{inst}@127.0.0.1"),
            "stty size; echo TERM=$TERM; exit 3",
        ],
    );
    let o = output_within(&mut tt, LIMIT);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(text.contains("TERM=xterm-256color"), "{text}");
    assert!(
        text.lines().any(|l| {
            let n: Vec<u32> = l.trim().split(' ').filter_map(|n| n.parse().ok()).collect();
            n.len() == 2 && n.iter().all(|&x| x > 0)
        }),
        "no terminal size line: {text}"
    );
    // Bob's key is not alice's: refused before the machine is reached.
    let o = output_within(
        &mut ssh("bkey", &[&format!("{inst}@127.0.0.1"), "true"]),
        LIMIT,
    );
    assert_eq!(o.status.code(), Some(255), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
        "{o:?}"
    );
    // `farmer gomote ssh` runs the user's own ssh.
    let mut via = alice.cmd(&["ssh", inst, "-i", dir.path().join("akey").to_str().unwrap()]);
    via.args(SSH_QUIET);
    via.stdin(
        std::fs::File::open({
            let f = dir.path().join("script");
            std::fs::write(&f, "echo via-cli; exit 4\n").unwrap();
            f
        })
        .unwrap(),
    );
    let o = output_within(&mut via, LIMIT);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("via-cli"));
    // A session's processes end with its client.
    let marker = format!("1001.{}", std::process::id());
    let mut held = Reaped(
        ssh(
            "akey",
            &[
                "-tt",
                &format!("{inst}@127.0.0.1"),
                &format!("sleep {marker}"),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let deadline = Instant::now() + LIMIT;
    while crate::ssh::marked(&marker).is_empty() {
        assert!(Instant::now() < deadline, "the remote sleep never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    held.0.kill().unwrap();
    held.0.wait().unwrap();
    let deadline = Instant::now() + LIMIT;
    while !crate::ssh::marked(&marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the remote sleep outlived its ssh client"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Destroy: the machine is cleaned and goes back to the pool; a call
    // on the instance then says it was destroyed.
    let second_machine = instance(&alice, second)["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    alice.ok(&["put", second, local.to_str().unwrap(), "left-behind.txt"]);
    let wd = bots.join(format!("wd-{second_machine}"));
    assert!(wd.join("left-behind.txt").exists());
    alice.ok(&["destroy", second]);
    let e = alice.fails(&["ping", second]);
    assert!(e.contains("was destroyed at"), "{e}");
    c.wait("the machine idle again", LIMIT, |c| {
        c.get("/api/machines")["connected"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["hostname"] == second_machine.as_str() && m["state"] == "idle")
            .then_some(())
    });
    assert!(
        !wd.join("left-behind.txt").exists(),
        "the machine was not cleaned"
    );

    // Expiry: renewed by calls, then expired when idle past the timeout
    // (alice keeps hers alive meanwhile).
    let bobs = bob.ok(&["create", "host-test-trusted"]);
    let bobs = bobs.trim().to_string();
    let created = Instant::now();
    let admin = [("authorization", format!("Bearer {}", c.token))];
    let admin: Vec<(&str, &str)> = admin.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let alive = |name: &str| {
        crate::common::http("GET", &c.url("/api/gomote/instances"), &admin, "")
            .body
            .contains(name)
    };
    // Alice keeps hers alive every few seconds while time passes.
    let until = |at: Instant| {
        while Instant::now() < at {
            alice.ok(&["ping", inst]);
            std::thread::sleep(
                at.saturating_duration_since(Instant::now())
                    .min(Duration::from_secs(3)),
            );
        }
    };
    until(created + Duration::from_secs(6));
    bob.ok(&["ping", &bobs]);
    let pinged = Instant::now();
    until(created + Duration::from_secs(12));
    // Past the 10 s timeout since creation, but not since the ping: alive.
    assert!(
        pinged.elapsed() < Duration::from_secs(9),
        "this runner is too slow to check a renewal against a 10 s timeout"
    );
    assert!(alive(&bobs), "renewed by its ping, yet gone");
    let start = Instant::now();
    while alive(&bobs) {
        assert!(start.elapsed() < Duration::from_secs(40), "never expired");
        alice.ok(&["ping", inst]);
        std::thread::sleep(Duration::from_millis(500));
    }
    let e = bob.fails(&["ping", &bobs]);
    assert!(e.contains(&format!("instance {bobs} expired at")), "{e}");

    // A coordinator restart: the instance keeps its machine (which
    // reconnects) and its files.
    let addr = c.addr.clone();
    drop(c);
    let c = Coordinator::start_on(&data, &cfg, &addr);
    c.wait("bot-a back", LIMIT, |c| {
        c.connected().iter().any(|h| h == "bot-a").then_some(())
    });
    let out = alice.ok(&["run", "-system", inst, "cat", "sub/hello.txt"]);
    assert_eq!(out.trim(), "hello gomote");
    assert_eq!(instance(&alice, inst)["hostname"], "bot-a");
    let metrics = c.get_text("/metrics");
    assert!(
        metrics.contains("farmer_gomote_leases{host_type=\"host-test-trusted\"} 1"),
        "{metrics}"
    );
}
