//! `farmer build ...`: queue, follow, list, cancel and rebuild builds from
//! a terminal, through the coordinator's API (what the README's curl lines
//! do, with errors that say what went wrong and exit codes a script can
//! use: `watch` and `trigger --wait` exit 0 when the build passed, 1 when
//! it failed, 2 otherwise, errors included).

use std::io::Write;

use anyhow::Context;
use clap::Subcommand;
use serde_json::{Value, json};

use crate::admin_cli::Remote;
use crate::client::ApiClient;

#[derive(Subcommand, Debug)]
pub enum BuildCmd {
    /// Queue a build of BUILDER at a commit (a hash, a branch, or the
    /// repo's first branch's head); --wait follows its log to the end.
    Trigger {
        #[command(flatten)]
        remote: Remote,
        builder: String,
        /// A commit hash or a branch name.
        #[arg(long)]
        commit: Option<String>,
        /// interactive, pre-submit, post-submit or release.
        #[arg(long, default_value = "interactive")]
        kind: String,
        /// Follow the build's log and exit with its result.
        #[arg(long)]
        wait: bool,
    },
    /// Print a build's log as it grows, until the build ends; exit 0 if it
    /// passed, 1 if it failed, 2 otherwise.
    Watch {
        #[command(flatten)]
        remote: Remote,
        id: i64,
    },
    /// List builds, newest first.
    List {
        #[command(flatten)]
        remote: Remote,
        #[arg(long)]
        builder: Option<String>,
        /// queued, running, passed, failed, infra-error or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running build.
    Cancel {
        #[command(flatten)]
        remote: Remote,
        id: i64,
    },
    /// Queue the same build again.
    Rebuild {
        #[command(flatten)]
        remote: Remote,
        id: i64,
    },
}

/// The API as the admin or a user: `--token-file`, else `$FARMER_TOKEN`,
/// else the login `farmer gomote login` saved (its coordinator too, unless
/// `--coordinator` says otherwise), else the data dir's admin token.
fn client(remote: &Remote) -> anyhow::Result<ApiClient> {
    let mut coordinator = remote.coordinator.clone();
    let mut pin = remote.tls_pin.clone();
    let token = match std::env::var("FARMER_TOKEN") {
        Ok(t) if remote.token_file.is_none() && !t.trim().is_empty() => t,
        _ => match saved_login(remote) {
            Some(l) => {
                if coordinator == crate::admin_cli::DEFAULT_COORDINATOR && !l.coordinator.is_empty()
                {
                    coordinator = l.coordinator;
                    pin = pin.or(l.tls_pin);
                }
                l.token
            }
            None => remote.admin_token().context(
                "give --token-file FILE, set $FARMER_TOKEN, or run `farmer gomote login` first",
            )?,
        },
    };
    ApiClient::new(&coordinator, Some(token.trim()), pin.as_deref())
}

/// The saved gomote login, when no token file was named and one exists.
fn saved_login(remote: &Remote) -> Option<crate::gomote::cli::Login> {
    if remote.token_file.is_some() {
        return None;
    }
    let path = crate::gomote::cli::config_path().ok()?;
    let text = std::fs::read_to_string(path).ok()?;
    let l: crate::gomote::cli::Login = toml::from_str(&text).ok()?;
    (!l.token.is_empty()).then_some(l)
}

/// What `watch` exits with for a build's final status.
pub fn exit_code(status: &str) -> i32 {
    match status {
        "passed" => 0,
        "failed" => 1,
        _ => 2,
    }
}

/// Follows build `id`'s log to its end; returns its final status.
async fn watch(api: &ApiClient, id: i64) -> anyhow::Result<String> {
    // A queued build has no live log yet: wait for its machine.
    let mut said = false;
    loop {
        let b = api
            .call(http::Method::GET, &format!("/api/builds/{id}"), None)
            .await?;
        if b["build"]["status"] != "queued" {
            break;
        }
        if !said {
            eprintln!("build {id} is queued; waiting for a machine");
            said = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut stdout = std::io::stdout();
    api.stream(&format!("/api/builds/{id}/log"), |data| {
        stdout.write_all(data)?;
        stdout.flush()
    })
    .await?;
    // The stream ends with the build; its status may take a moment to be
    // recorded after the last line.
    for _ in 0..50 {
        let b = api
            .call(http::Method::GET, &format!("/api/builds/{id}"), None)
            .await?;
        let status = b["build"]["status"].as_str().unwrap_or("").to_string();
        if !matches!(status.as_str(), "queued" | "running" | "") {
            return Ok(status);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::bail!("build {id}'s log ended but the build is still not finished")
}

fn row(b: &Value) -> String {
    format!(
        "{:>6}  {:<12} {:<24} {:<12} {}",
        b["id"],
        b["status"].as_str().unwrap_or(""),
        b["builder"].as_str().unwrap_or(""),
        b["commit"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(12)
            .collect::<String>(),
        b["error"].as_str().unwrap_or("")
    )
}

/// Runs a `farmer build` command; returns the process's exit code.
pub fn run_build(cmd: BuildCmd) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cmd {
            BuildCmd::Trigger {
                remote,
                builder,
                commit,
                kind,
                wait,
            } => {
                let api = client(&remote)?;
                let mut body = json!({"builder": builder, "kind": kind});
                if let Some(c) = commit {
                    body["commit"] = json!(c);
                }
                let v = api
                    .call(http::Method::POST, "/api/builds", Some(body))
                    .await?;
                let id = v["id"]
                    .as_i64()
                    .context("the coordinator gave no build id")?;
                println!("build {id} queued: {}/builds/{id}", api.base());
                if !wait {
                    return Ok(0);
                }
                let status = watch(&api, id).await?;
                println!("build {id} {status}");
                Ok(exit_code(&status))
            }
            BuildCmd::Watch { remote, id } => {
                let api = client(&remote)?;
                let status = watch(&api, id).await?;
                Ok(exit_code(&status))
            }
            BuildCmd::List {
                remote,
                builder,
                status,
                limit,
                json,
            } => {
                let api = client(&remote)?;
                let mut path = format!("/api/builds?limit={}", limit.clamp(1, 1000));
                for (k, v) in [("builder", builder), ("status", status)] {
                    if let Some(v) = v {
                        let v: String = form_urlencoded::byte_serialize(v.as_bytes()).collect();
                        path.push_str(&format!("&{k}={v}"));
                    }
                }
                let v = api.call(http::Method::GET, &path, None).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    println!(
                        "{:>6}  {:<12} {:<24} {:<12} detail",
                        "id", "status", "builder", "commit"
                    );
                    for b in v.as_array().into_iter().flatten() {
                        println!("{}", row(b));
                    }
                }
                Ok(0)
            }
            BuildCmd::Cancel { remote, id } => {
                let v = client(&remote)?
                    .call(
                        http::Method::POST,
                        &format!("/api/builds/{id}/cancel"),
                        None,
                    )
                    .await?;
                println!(
                    "build {id}: {}",
                    v["status"].as_str().unwrap_or("cancelled")
                );
                Ok(0)
            }
            BuildCmd::Rebuild { remote, id } => {
                let api = client(&remote)?;
                let v = api
                    .call(
                        http::Method::POST,
                        &format!("/api/builds/{id}/rebuild"),
                        None,
                    )
                    .await?;
                let new = v["id"].as_i64().unwrap_or(0);
                println!(
                    "build {new} queued (again {id}): {}/builds/{new}",
                    api.base()
                );
                Ok(0)
            }
        }
    })
}
