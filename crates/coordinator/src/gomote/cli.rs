//! `farmer gomote …` (also the `gomote` binary): the user's side of
//! interactive leases. Every call goes to the coordinator with the user's
//! token; file and command calls go through the coordinator's proxy of the
//! buildlet API, driven by the same typed buildlet client the coordinator
//! uses for builds.
//!
//! The token and coordinator are kept in the user config dir
//! (`$XDG_CONFIG_HOME/farmer/gomote.toml` or `~/.config/farmer/gomote.toml`,
//! mode 0600) by `login`; `$FARMER_COORDINATOR`, `$FARMER_TOKEN` and
//! `$FARMER_TLS_PIN` override it. With `$GOMOTE_GROUP` set, a command whose
//! first argument is not one of your instances runs on every instance of
//! that group.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use buildlet::client::{Client, ExecOptions, LsOptions, Progress};

use crate::client::ApiClient;
use buildlet::proto::ProcessState;

/// Lease farm machines and work on them: copy trees in, run commands, open
/// a shell, and give them back.
///
/// Start with `login` (your admin gives you a token), then `create` an
/// instance of a builder or host type, work on it, and `destroy` it. An
/// instance nobody uses expires (30 minutes by default); every call renews
/// it. Go-style single-dash flags work (`-count 2`).
#[derive(Parser, Debug)]
#[command(name = "gomote", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Remember the coordinator and your token (from --token-file or $FARMER_TOKEN).
    Login {
        /// Coordinator URL, e.g. https://farm.example.org:8080.
        #[arg(long)]
        coordinator: String,
        /// File holding the token `farmer user add` printed.
        #[arg(long = "token-file")]
        token_file: Option<PathBuf>,
        /// Trust exactly this coordinator key (spki-sha256:HEX) or certificate (HEX).
        #[arg(long = "tls-pin")]
        tls_pin: Option<String>,
    },
    /// Lease machines of a builder or host type; waits for them, printing the
    /// place in the queue, then prints the instance names.
    Create {
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Add the new instances to this group (created if missing).
        #[arg(long)]
        group: Option<String>,
        /// Return at once instead of waiting for the machines.
        #[arg(long = "no-wait")]
        no_wait: bool,
        #[arg(value_name = "BUILDER-or-HOST-TYPE")]
        builder: String,
    },
    /// Your instances (all of them for an admin).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Give instances back (or every instance of -group G).
    Destroy {
        #[arg(long)]
        group: Option<String>,
        #[arg(value_name = "INST")]
        instances: Vec<String>,
    },
    /// Renew instances (every call does).
    Ping {
        #[arg(value_name = "INST")]
        instances: Vec<String>,
    },
    /// List files: ls [-R] [-d] INST [DIR].
    Ls {
        /// Recursive.
        #[arg(short = 'R')]
        recursive: bool,
        /// With SHA-256 digests of files.
        #[arg(short = 'd')]
        digest: bool,
        #[arg(value_name = "[INST] [DIR]")]
        args: Vec<String>,
    },
    /// Write one file: put [-mode 0755] INST SRC|- [DST].
    Put {
        #[arg(long, default_value = "0644")]
        mode: String,
        #[arg(value_name = "[INST] SRC|- [DST]", required = true)]
        args: Vec<String>,
    },
    /// Unpack a tar.gz (a local file, or a URL the machine fetches): puttar [-dir D] INST FILE|URL.
    Puttar {
        #[arg(long)]
        dir: Option<String>,
        #[arg(value_name = "[INST] FILE|URL", required = true)]
        args: Vec<String>,
    },
    /// Copy one file from the machine: get INST PATH [LOCAL] (LOCAL - is stdout).
    Get {
        #[arg(value_name = "INST PATH [LOCAL]", required = true)]
        args: Vec<String>,
    },
    /// A tar.gz of the work dir (or -dir D) on stdout: gettar INST > out.tgz.
    Gettar {
        #[arg(long)]
        dir: Option<String>,
        #[arg(value_name = "INST", required = true)]
        args: Vec<String>,
    },
    /// Remove files or directories: rm INST PATH...
    Rm {
        #[arg(value_name = "[INST] PATH...", required = true)]
        args: Vec<String>,
    },
    /// Run a command; its output streams here and its exit status becomes ours.
    Run {
        /// Look the command up on the system only, not in the work dir.
        #[arg(long)]
        system: bool,
        /// KEY=VALUE added to the environment (repeatable).
        #[arg(short = 'e')]
        env: Vec<String>,
        /// Directory to run in, relative to the work dir.
        #[arg(long)]
        dir: Option<String>,
        /// Replaces PATH: comma-separated entries; $PATH, $WORKDIR and $EMPTY expand on the machine.
        #[arg(long)]
        path: Option<String>,
        /// Run again until the output matches this regular expression.
        #[arg(long)]
        until: Option<String>,
        /// Also write INST.stdout and INST.tar.gz (the work dir) here.
        #[arg(long)]
        collect: bool,
        #[arg(
            value_name = "[INST] CMD ARGS",
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        args: Vec<String>,
    },
    /// Sync a local tree to the machine by content hash: only new or changed
    /// files are sent, files gone locally are removed (.git is left out).
    Push {
        /// Where on the machine (relative to the work dir); default: the local directory's name.
        #[arg(long)]
        dest: Option<String>,
        #[arg(value_name = "[INST] LOCAL-DIR", required = true)]
        args: Vec<String>,
    },
    /// Open a shell on the machine with your own ssh (your key registered
    /// with `farmer user add-key`); arguments after INST go to ssh.
    Ssh {
        #[arg(
            value_name = "INST [SSH-ARGS]",
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        args: Vec<String>,
    },
    /// Named sets of instances; $GOMOTE_GROUP broadcasts commands to one.
    #[command(subcommand)]
    Group(GroupCmd),
}

#[derive(Subcommand, Debug)]
enum GroupCmd {
    Create {
        name: String,
    },
    /// Delete a group (its instances stay; `destroy -group G` ends them).
    Destroy {
        name: String,
    },
    Add {
        name: String,
        #[arg(required = true)]
        instances: Vec<String>,
    },
    Remove {
        name: String,
        #[arg(required = true)]
        instances: Vec<String>,
    },
    List,
}

/// What `login` keeps.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Login {
    pub coordinator: String,
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_pin: Option<String>,
}

/// Where `login` keeps the coordinator and token.
pub fn config_path() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(
            std::env::var_os("HOME").context("neither $XDG_CONFIG_HOME nor $HOME is set")?,
        )
        .join(".config"),
    };
    Ok(base.join("farmer").join("gomote.toml"))
}

fn load_login() -> anyhow::Result<Login> {
    let path = config_path()?;
    let mut l: Login = match std::fs::read_to_string(&path) {
        Ok(s) => toml::from_str(&s).with_context(|| format!("reading {}", path.display()))?,
        Err(_) => Login::default(),
    };
    if let Ok(c) = std::env::var("FARMER_COORDINATOR") {
        l.coordinator = c;
    }
    if let Ok(t) = std::env::var("FARMER_TOKEN") {
        l.token = t.trim().to_string();
    }
    if let Ok(p) = std::env::var("FARMER_TLS_PIN") {
        l.tls_pin = Some(p);
    }
    if l.coordinator.is_empty() || l.token.is_empty() {
        bail!(
            "not logged in: run `farmer gomote login --coordinator URL --token-file FILE` (or set $FARMER_COORDINATOR and $FARMER_TOKEN)"
        );
    }
    Ok(l)
}

/// The coordinator, as this user.
#[derive(Clone)]
pub struct Coord(ApiClient);

impl Coord {
    pub fn new(l: &Login) -> anyhow::Result<Coord> {
        ApiClient::new(&l.coordinator, Some(&l.token), l.tls_pin.as_deref()).map(Coord)
    }

    /// A JSON call; a non-2xx answer becomes an error with the server's sentence.
    pub async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        self.0.call(method, path, body).await
    }

    /// A buildlet client for an instance, through the coordinator.
    pub fn instance(&self, name: &str, long: bool) -> Client {
        self.0
            .buildlet(&format!("/api/gomote/instances/{name}/buildlet"), long)
    }
}

/// Runs `gomote` with these arguments (the first is the program name);
/// returns the process exit status.
pub fn main_from(args: Vec<std::ffi::OsString>) -> i32 {
    let cli: Cli = goflags::parse_from(args);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gomote: {e}");
            return 1;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gomote: {e:#}");
            1
        }
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<i32> {
    if let Cmd::Login {
        coordinator,
        token_file,
        tls_pin,
    } = cmd
    {
        return login(coordinator, token_file, tls_pin).await;
    }
    let c = Coord::new(&load_login()?)?;
    match cmd {
        Cmd::Login { .. } => unreachable!("handled above"),
        Cmd::Create {
            count,
            group,
            no_wait,
            builder,
        } => create(&c, count, group, no_wait, &builder).await,
        Cmd::List { json } => list(&c, json).await,
        Cmd::Destroy { group, instances } => {
            let mut names = instances;
            if let Some(g) = group {
                names.extend(group_members(&c, &g).await?);
            }
            if names.is_empty() {
                names = from_env_group(&c).await?;
            }
            for n in names {
                c.call(
                    http::Method::DELETE,
                    &format!("/api/gomote/instances/{n}"),
                    None,
                )
                .await?;
                println!("destroyed {n}");
            }
            Ok(0)
        }
        Cmd::Ping { instances } => {
            let names = if instances.is_empty() {
                from_env_group(&c).await?
            } else {
                instances
            };
            for n in names {
                let v = c
                    .call(
                        http::Method::POST,
                        &format!("/api/gomote/instances/{n}/ping"),
                        None,
                    )
                    .await?;
                println!(
                    "{n}: renewed until {}",
                    super::utc(v["expires_at"].as_i64().unwrap_or(0))
                );
            }
            Ok(0)
        }
        Cmd::Ls {
            recursive,
            digest,
            args,
        } => {
            let (targets, rest) = targets(&c, &args).await?;
            let dir = rest.first().cloned().unwrap_or_default();
            for t in &targets {
                let entries = c
                    .instance(t, false)
                    .ls(
                        &dir,
                        &LsOptions {
                            recursive,
                            digest,
                            skip: Vec::new(),
                        },
                    )
                    .await?;
                for e in entries {
                    let line = match (&e.sha256, &e.link) {
                        (Some(h), _) => format!("{:o}\t{}\t{}\t{h}", e.mode, e.size, e.path),
                        (None, Some(l)) => format!("{:o}\t{}\t{} -> {l}", e.mode, e.size, e.path),
                        _ => format!("{:o}\t{}\t{}", e.mode, e.size, e.path),
                    };
                    print_for(&targets, t, &line);
                }
            }
            Ok(0)
        }
        Cmd::Put { mode, args } => {
            let (targets, rest) = targets(&c, &args).await?;
            let (src, dst) = match rest.as_slice() {
                [src] if src != "-" => (src.clone(), base_name(src)?),
                [src, dst] => (src.clone(), dst.clone()),
                _ => bail!("put takes [INST] SRC [DST]; reading stdin (-) needs a DST"),
            };
            let mode = u32::from_str_radix(mode.trim_start_matches("0o"), 8)
                .with_context(|| format!("-mode {mode:?} is not an octal mode like 0755"))?;
            let content = if src == "-" {
                let mut v = Vec::new();
                tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut v).await?;
                v
            } else {
                std::fs::read(&src).with_context(|| format!("reading {src}"))?
            };
            for t in &targets {
                c.instance(t, true)
                    .put_file(&dst, mode, Bytes::from(content.clone()))
                    .await?;
                print_for(
                    &targets,
                    t,
                    &format!("wrote {dst} ({} bytes)", content.len()),
                );
            }
            Ok(0)
        }
        Cmd::Puttar { dir, args } => {
            let (targets, rest) = targets(&c, &args).await?;
            let [src] = rest.as_slice() else {
                bail!("puttar takes [INST] FILE|URL")
            };
            let dir = dir.unwrap_or_default();
            for t in &targets {
                let cl = c.instance(t, true);
                if src.starts_with("http://") || src.starts_with("https://") {
                    cl.put_tgz_from_url(&dir, src).await?;
                } else {
                    let f = tokio::fs::File::open(src)
                        .await
                        .with_context(|| format!("opening {src}"))?;
                    let total = f.metadata().await.ok().map(|m| m.len());
                    let bar = Bar::new("puttar", total);
                    cl.put_tgz(&dir, f, Some(bar.progress())).await?;
                    bar.finish();
                }
                print_for(
                    &targets,
                    t,
                    &format!(
                        "unpacked {src} into {}",
                        if dir.is_empty() { "." } else { &dir }
                    ),
                );
            }
            Ok(0)
        }
        Cmd::Get { args } => {
            let [inst, path, rest @ ..] = args.as_slice() else {
                bail!("get takes INST PATH [LOCAL]")
            };
            let local = match rest {
                [] => base_name(path)?,
                [l] => l.clone(),
                _ => bail!("get takes INST PATH [LOCAL]"),
            };
            get(&c, inst, path, &local).await
        }
        Cmd::Gettar { dir, args } => {
            let [inst] = args.as_slice() else {
                bail!("gettar takes INST (and -dir D)")
            };
            let bar = Bar::new("gettar", None);
            let mut out = tokio::io::stdout();
            c.instance(inst, false)
                .get_tgz(dir.as_deref().unwrap_or(""), &mut out, Some(bar.progress()))
                .await?;
            bar.finish();
            Ok(0)
        }
        Cmd::Rm { args } => {
            let (targets, rest) = targets(&c, &args).await?;
            if rest.is_empty() {
                bail!("rm takes [INST] PATH...");
            }
            let paths: Vec<&str> = rest.iter().map(String::as_str).collect();
            for t in &targets {
                c.instance(t, false).remove_all(&paths).await?;
            }
            Ok(0)
        }
        Cmd::Run {
            system,
            env,
            dir,
            path,
            until,
            collect,
            args,
        } => {
            let (targets, rest) = targets(&c, &args).await?;
            let Some((cmd, cmd_args)) = rest.split_first() else {
                bail!("run takes [INST] CMD ARGS...")
            };
            let opts = ExecOptions {
                args: cmd_args.to_vec(),
                env,
                dir,
                path: path
                    .map(|p| p.split(',').map(str::to_string).collect())
                    .unwrap_or_default(),
                sys: system,
                timeout: None,
                debug: false,
            };
            let until = until
                .map(|u| {
                    regex_lite::Regex::new(&u)
                        .with_context(|| format!("-until {u:?} is not a regular expression"))
                })
                .transpose()?;
            run_cmd(&c, &targets, cmd, &opts, until.as_ref(), collect).await
        }
        Cmd::Push { dest, args } => {
            let (targets, rest) = targets(&c, &args).await?;
            let [local] = rest.as_slice() else {
                bail!("push takes [INST] LOCAL-DIR")
            };
            let dest = match dest {
                Some(d) => d,
                None => base_name(local)?,
            };
            for t in &targets {
                let s = super::push::push(&c.instance(t, true), Path::new(local), &dest).await?;
                print_for(&targets, t, &s.to_string());
            }
            Ok(0)
        }
        Cmd::Ssh { args } => ssh(&c, &args).await,
        Cmd::Group(g) => group(&c, g).await,
    }
}

async fn login(
    coordinator: String,
    token_file: Option<PathBuf>,
    tls_pin: Option<String>,
) -> anyhow::Result<i32> {
    let token = match &token_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the token file {}", f.display()))?,
        None => {
            std::env::var("FARMER_TOKEN").context("give --token-file FILE or set $FARMER_TOKEN")?
        }
    };
    let l = Login {
        coordinator,
        token: token.trim().to_string(),
        tls_pin,
    };
    let v = Coord::new(&l)?
        .call(http::Method::GET, "/api/gomote/info", None)
        .await?;
    let path = config_path()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    atomicfile::write(&path, toml::to_string(&l)?.as_bytes(), Some(0o600))
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "logged in to {} as {}{}; saved in {}",
        l.coordinator,
        v["user"].as_str().unwrap_or("?"),
        if v["admin"].as_bool() == Some(true) {
            " (admin)"
        } else {
            ""
        },
        path.display()
    );
    Ok(0)
}

fn base_name(p: &str) -> anyhow::Result<String> {
    Path::new(p.trim_end_matches('/'))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{p:?} has no file name"))
}

/// Prefixes a line with the instance when a command runs on several.
fn print_for(targets: &[String], t: &str, line: &str) {
    if targets.len() > 1 {
        println!("{t}: {line}");
    } else {
        println!("{line}");
    }
}

async fn group_members(c: &Coord, g: &str) -> anyhow::Result<Vec<String>> {
    let v = c
        .call(http::Method::GET, "/api/gomote/groups", None)
        .await?;
    let Some(found) = v.as_array().into_iter().flatten().find(|x| x["name"] == g) else {
        bail!("no group named {g}; `farmer gomote group list` shows yours");
    };
    let members: Vec<String> = found["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect();
    if members.is_empty() {
        bail!("group {g} has no instances");
    }
    Ok(members)
}

async fn from_env_group(c: &Coord) -> anyhow::Result<Vec<String>> {
    match std::env::var("GOMOTE_GROUP").ok().filter(|g| !g.is_empty()) {
        Some(g) => group_members(c, &g).await,
        None => bail!("name an instance (or set $GOMOTE_GROUP to use every instance of a group)"),
    }
}

/// Splits `[INST] REST...`: the first argument is the instance unless
/// `$GOMOTE_GROUP` is set and it is not one of the caller's instances, in
/// which case the command goes to every instance of the group.
async fn targets(c: &Coord, args: &[String]) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let group = std::env::var("GOMOTE_GROUP").ok().filter(|g| !g.is_empty());
    let Some(group) = group else {
        let Some((first, rest)) = args.split_first() else {
            bail!("name an instance")
        };
        return Ok((vec![first.clone()], rest.to_vec()));
    };
    if let Some(first) = args.first() {
        let mine = c
            .call(http::Method::GET, "/api/gomote/instances", None)
            .await?;
        if mine
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["name"] == first.as_str())
        {
            return Ok((vec![first.clone()], args[1..].to_vec()));
        }
    }
    Ok((group_members(c, &group).await?, args.to_vec()))
}

async fn create(
    c: &Coord,
    count: u32,
    group: Option<String>,
    no_wait: bool,
    builder: &str,
) -> anyhow::Result<i32> {
    if count == 0 {
        bail!("-count must be at least 1");
    }
    if let Some(g) = &group {
        match c
            .call(
                http::Method::POST,
                "/api/gomote/groups",
                Some(json!({ "name": g })),
            )
            .await
        {
            Ok(_) => eprintln!("created group {g}"),
            Err(e) if e.to_string().contains("exists already") => {}
            Err(e) => return Err(e),
        }
    }
    let mut names = Vec::new();
    for _ in 0..count {
        let v = c
            .call(
                http::Method::POST,
                "/api/gomote/instances",
                Some(json!({ "builder": builder, "group": group })),
            )
            .await?;
        let name = v["name"].as_str().unwrap_or_default().to_string();
        note_place(&name, &v);
        names.push(name);
    }
    if !no_wait {
        let mut last_note = Instant::now();
        for n in &names {
            loop {
                let v = c
                    .call(
                        http::Method::GET,
                        &format!("/api/gomote/instances/{n}?wait=5"),
                        None,
                    )
                    .await?;
                if v["state"] == "ready" {
                    break;
                }
                if last_note.elapsed() >= Duration::from_secs(3) {
                    note_place(n, &v);
                    last_note = Instant::now();
                }
            }
        }
    }
    for n in names {
        println!("{n}");
    }
    Ok(0)
}

/// Says where a waiting instance stands in the queue, and why it waits.
fn note_place(name: &str, v: &Value) {
    if v["state"] == "ready" || !v["queue_position"].is_u64() {
        return;
    }
    eprintln!(
        "{name}: waiting for a machine of {}: place {} of {} in the queue ({})",
        v["host_type"].as_str().unwrap_or("?"),
        v["queue_position"],
        v["queue_length"],
        v["waiting_because"].as_str().unwrap_or("")
    );
}

async fn list(c: &Coord, json_out: bool) -> anyhow::Result<i32> {
    let v = c
        .call(http::Method::GET, "/api/gomote/instances", None)
        .await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    for i in v.as_array().into_iter().flatten() {
        println!(
            "{}\t{}\t{}\t{}\texpires {}",
            i["name"].as_str().unwrap_or(""),
            i["state"].as_str().unwrap_or(""),
            i["host_type"].as_str().unwrap_or(""),
            i["hostname"].as_str().unwrap_or("-"),
            super::utc(i["expires_at"].as_i64().unwrap_or(0)),
        );
    }
    Ok(0)
}

async fn get(c: &Coord, inst: &str, path: &str, local: &str) -> anyhow::Result<i32> {
    let mut tgz = Vec::new();
    c.instance(inst, false)
        .get_tgz(path, &mut tgz, None)
        .await?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&tgz[..]));
    let mut entries = ar.entries()?;
    let Some(entry) = entries.next() else {
        bail!("{path}: the machine sent an empty archive")
    };
    let mut entry = entry?;
    if entry.header().entry_type() != tar::EntryType::Regular {
        bail!("{path} is a directory; use `gettar -dir {path}` for directories");
    }
    let mut content = Vec::new();
    std::io::Read::read_to_end(&mut entry, &mut content)?;
    if local == "-" {
        std::io::Write::write_all(&mut std::io::stdout().lock(), &content)?;
    } else {
        std::fs::write(local, &content).with_context(|| format!("writing {local}"))?;
        eprintln!("wrote {local} ({} bytes)", content.len());
    }
    Ok(0)
}

/// What exit status the CLI gives a remote command's end.
fn exit_code(st: &ProcessState) -> i32 {
    match st {
        ProcessState::Ok => 0,
        ProcessState::Exited(c) => *c,
        ProcessState::Signaled(s) => 128 + s,
        ProcessState::TimedOut(_) => 124,
        ProcessState::Error(e) => {
            eprintln!("gomote: the command could not run: {e}");
            127
        }
    }
}

async fn run_cmd(
    c: &Coord,
    targets: &[String],
    cmd: &str,
    opts: &ExecOptions,
    until: Option<&regex_lite::Regex>,
    collect: bool,
) -> anyhow::Result<i32> {
    let mut code = 0;
    if targets.len() == 1 && until.is_none() && !collect {
        let mut out = tokio::io::stdout();
        let st = c
            .instance(&targets[0], false)
            .exec(cmd, opts, &mut out)
            .await?;
        return Ok(exit_code(&st));
    }
    let runs = targets.iter().map(|t| async move {
        let cl = c.instance(t, false);
        loop {
            let (st, out) = cl.exec_output(cmd, opts).await?;
            let done = until.is_none_or(|re| re.is_match(&String::from_utf8_lossy(&out)));
            if done {
                return anyhow::Ok((t.clone(), st, out));
            }
            eprintln!("{t}: output did not match -until yet; running again");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    for r in futures_util::future::join_all(runs).await {
        let (t, st, out) = r?;
        let text = String::from_utf8_lossy(&out);
        if targets.len() > 1 {
            for line in text.lines() {
                println!("{t}: {line}");
            }
        } else {
            print!("{text}");
        }
        if collect {
            std::fs::write(format!("{t}.stdout"), &out)?;
            let mut f = tokio::fs::File::create(format!("{t}.tar.gz")).await?;
            c.instance(&t, false).get_tgz("", &mut f, None).await?;
            eprintln!("{t}: wrote {t}.stdout and {t}.tar.gz");
        }
        let e = exit_code(&st);
        if code == 0 {
            code = e;
        }
    }
    Ok(code)
}

async fn ssh(c: &Coord, args: &[String]) -> anyhow::Result<i32> {
    let (inst, extra) = args.split_first().context("ssh takes INST")?;
    let info = c.call(http::Method::GET, "/api/gomote/info", None).await?;
    let Some(addr) = info["ssh"].as_str() else {
        bail!("this coordinator serves no SSH (start it with --ssh-listen ADDR)");
    };
    // Renews the instance and checks it is ours before ssh starts.
    c.call(
        http::Method::GET,
        &format!("/api/gomote/instances/{inst}"),
        None,
    )
    .await?;
    let port = addr.rsplit_once(':').map(|(_, p)| p).unwrap_or("22");
    let host = coordinator_host(c.0.base());
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-p")
        .arg(port)
        .args(extra)
        .arg(format!("{inst}@{host}"));
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let e = cmd.exec();
        bail!("could not run ssh: {e}");
    }
    #[cfg(not(unix))]
    {
        let st = cmd.status().context("could not run ssh")?;
        Ok(st.code().unwrap_or(1))
    }
}

/// The host part of the coordinator URL.
fn coordinator_host(base: &str) -> String {
    let rest = base.split_once("://").map_or(base, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    match hostport.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6).to_string(),
        None => hostport
            .rsplit_once(':')
            .map_or(hostport, |(h, _)| h)
            .to_string(),
    }
}

async fn group(c: &Coord, g: GroupCmd) -> anyhow::Result<i32> {
    match g {
        GroupCmd::Create { name } => {
            c.call(
                http::Method::POST,
                "/api/gomote/groups",
                Some(json!({ "name": name })),
            )
            .await?;
            println!("created group {name}");
        }
        GroupCmd::Destroy { name } => {
            c.call(
                http::Method::DELETE,
                &format!("/api/gomote/groups/{name}"),
                None,
            )
            .await?;
            println!("deleted group {name}");
        }
        GroupCmd::Add { name, instances } => {
            for i in instances {
                c.call(
                    http::Method::POST,
                    &format!("/api/gomote/groups/{name}/instances"),
                    Some(json!({ "instance": i })),
                )
                .await?;
            }
        }
        GroupCmd::Remove { name, instances } => {
            for i in instances {
                c.call(
                    http::Method::DELETE,
                    &format!("/api/gomote/groups/{name}/instances/{i}"),
                    None,
                )
                .await?;
            }
        }
        GroupCmd::List => {
            let v = c
                .call(http::Method::GET, "/api/gomote/groups", None)
                .await?;
            for g in v.as_array().into_iter().flatten() {
                let members: Vec<&str> = g["instances"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str())
                    .collect();
                println!(
                    "{}\t{}",
                    g["name"].as_str().unwrap_or(""),
                    members.join(" ")
                );
            }
        }
    }
    Ok(0)
}

/// Progress of a long transfer: a bar on a terminal, a line every few
/// seconds otherwise, and a last line either way.
pub struct Bar {
    label: &'static str,
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    moved: Arc<std::sync::atomic::AtomicU64>,
}

impl Bar {
    pub fn new(label: &'static str, total: Option<u64>) -> Bar {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = match total {
                Some(t) => indicatif::ProgressBar::new(t),
                None => indicatif::ProgressBar::no_length(),
            };
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} {bytes}/{total_bytes} {bytes_per_sec} {wide_bar}",
            ) {
                b.set_style(style);
            }
            b.set_message(label);
            b
        });
        Bar {
            label,
            bar,
            started: Instant::now(),
            moved: Arc::default(),
        }
    }

    /// The callback the buildlet client calls with bytes moved so far.
    pub fn progress(&self) -> Progress {
        let bar = self.bar.clone();
        let label = self.label;
        let moved = self.moved.clone();
        let last = Arc::new(std::sync::Mutex::new(Instant::now()));
        Arc::new(move |n| {
            moved.store(n, std::sync::atomic::Ordering::Relaxed);
            match &bar {
                Some(b) => b.set_position(n),
                None => {
                    if let Ok(mut l) = last.lock()
                        && l.elapsed() >= Duration::from_secs(2)
                    {
                        *l = Instant::now();
                        eprintln!("{label}: {} so far", human_bytes(n));
                    }
                }
            }
        })
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        let n = self.moved.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "{}: {} in {:.1}s",
            self.label,
            human_bytes(n),
            self.started.elapsed().as_secs_f64()
        );
    }
}

pub use crate::view::human_bytes;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_hosts() {
        assert_eq!(
            coordinator_host("https://farm.example:8080"),
            "farm.example"
        );
        assert_eq!(coordinator_host("http://127.0.0.1:8080/"), "127.0.0.1");
        assert_eq!(coordinator_host("https://[::1]:8080"), "::1");
        assert_eq!(coordinator_host("https://farm.example"), "farm.example");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(&ProcessState::Ok), 0);
        assert_eq!(exit_code(&ProcessState::Exited(3)), 3);
        assert_eq!(exit_code(&ProcessState::Signaled(9)), 137);
    }
}
