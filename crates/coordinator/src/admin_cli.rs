//! `farmer request ...` and `farmer ca ...`: the owner's and the admin's side
//! of certificate onboarding, talking to a coordinator's API.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

/// Where the CLIs look for a coordinator unless told.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:8080";

/// How to reach the coordinator.
#[derive(Args, Debug, Clone)]
pub struct Remote {
    /// Coordinator URL.
    #[arg(long, default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
    /// Trust exactly the coordinator key (spki-sha256:HEX) or certificate
    /// (HEX) this pin names (for https URLs).
    #[arg(long = "tls-pin")]
    pub tls_pin: Option<String>,
    /// Admin token file (admin commands). Default: DATA_DIR/admin.token.
    #[arg(long = "token-file")]
    pub token_file: Option<PathBuf>,
    #[arg(long = "data-dir", default_value = "farmer-data")]
    pub data_dir: PathBuf,
}

impl Remote {
    /// The admin token: `--token-file`, else the data dir's.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        let f = self
            .token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join(crate::run::ADMIN_TOKEN_FILE));
        std::fs::read_to_string(&f)
            .with_context(|| format!("reading the admin token {}", f.display()))
    }
}

#[derive(Subcommand, Debug)]
pub enum RequestCmd {
    /// Submit a builder request (machine owner): prints the request id and secret.
    Submit {
        #[command(flatten)]
        remote: Remote,
        /// The machine's hostname (as given to genbotcert).
        #[arg(long)]
        hostname: String,
        /// The CSR written by genbotcert.
        #[arg(long)]
        csr: PathBuf,
        /// How the admin reaches you.
        #[arg(long)]
        contact: String,
        #[arg(long, default_value = "")]
        notes: String,
    },
    /// Check a request (owner, with its secret); writes the certificate once approved.
    Status {
        #[command(flatten)]
        remote: Remote,
        id: i64,
        #[arg(long)]
        secret: String,
        /// Where to write the certificate when approved.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List requests (admin).
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Approve a request, binding the hostname to a host type (admin).
    Approve {
        #[command(flatten)]
        remote: Remote,
        id: i64,
        #[arg(long = "host-type")]
        host_type: String,
    },
    /// Reject a request with a reason the owner reads (admin).
    Reject {
        #[command(flatten)]
        remote: Remote,
        id: i64,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaCmd {
    /// Revoke a machine certificate by serial or hostname (admin).
    Revoke {
        #[command(flatten)]
        remote: Remote,
        #[arg(long, conflicts_with = "hostname")]
        serial: Option<String>,
        #[arg(long)]
        hostname: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// `farmer user …`: the people who may lease machines with gomote.
#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Add a user; prints their token once (only its hash is kept).
    Add {
        #[command(flatten)]
        remote: Remote,
        name: String,
        /// May see and end every instance, and lease any host type open to someone.
        #[arg(long)]
        admin: bool,
    },
    /// List users with their SSH key fingerprints.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove a user; their instances end.
    Remove {
        #[command(flatten)]
        remote: Remote,
        name: String,
    },
    /// Register an SSH public key (a .pub file) for `ssh INSTANCE@coordinator`.
    AddKey {
        #[command(flatten)]
        remote: Remote,
        name: String,
        file: PathBuf,
    },
}

pub fn run_user(cmd: UserCmd) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cmd {
            UserCmd::Add {
                remote,
                name,
                admin,
            } => {
                let v = call(
                    &remote,
                    http::Method::POST,
                    "/api/users",
                    Some(serde_json::json!({ "name": name, "admin": admin })),
                    true,
                )
                .await?;
                eprintln!(
                    "added user {name}{}; give them this token (it is not shown again):",
                    if admin { " (admin)" } else { "" }
                );
                println!("{}", v["token"].as_str().unwrap_or(""));
            }
            UserCmd::List { remote } => {
                let v = call(&remote, http::Method::GET, "/api/users", None, true).await?;
                for u in v.as_array().into_iter().flatten() {
                    let keys: Vec<&str> = u["keys"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|k| k.as_str())
                        .collect();
                    println!(
                        "{}\t{}\t{}",
                        u["name"].as_str().unwrap_or(""),
                        if u["admin"].as_bool() == Some(true) {
                            "admin"
                        } else {
                            "user"
                        },
                        keys.join(" ")
                    );
                }
            }
            UserCmd::Remove { remote, name } => {
                let v = call(
                    &remote,
                    http::Method::DELETE,
                    &format!("/api/users/{name}"),
                    None,
                    true,
                )
                .await?;
                println!(
                    "removed user {name} ({} instances ended)",
                    v["instances_ended"]
                );
            }
            UserCmd::AddKey { remote, name, file } => {
                let key = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let v = call(
                    &remote,
                    http::Method::POST,
                    &format!("/api/users/{name}/keys"),
                    Some(serde_json::json!({ "key": key.trim() })),
                    true,
                )
                .await?;
                println!(
                    "added key {} for {name}",
                    v["fingerprint"].as_str().unwrap_or("")
                );
            }
        }
        Ok(())
    })
}

/// The header that carries a builder request's secret (never the URL, which
/// proxies and logs keep).
pub const SECRET_HEADER: &str = "x-farmer-request-secret";

async fn call(
    remote: &Remote,
    method: http::Method,
    path: &str,
    body: Option<serde_json::Value>,
    admin: bool,
) -> anyhow::Result<serde_json::Value> {
    call_with(remote, method, path, body, admin, None).await
}

async fn call_with(
    remote: &Remote,
    method: http::Method,
    path: &str,
    body: Option<serde_json::Value>,
    admin: bool,
    secret: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    let token = if admin {
        Some(remote.admin_token()?)
    } else {
        None
    };
    crate::client::ApiClient::new(
        &remote.coordinator,
        token.as_deref(),
        remote.tls_pin.as_deref(),
    )?
    .call_with(method, path, body, secret.map(|s| (SECRET_HEADER, s)))
    .await
}

pub fn run_request(cmd: RequestCmd) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cmd {
            RequestCmd::Submit { remote, hostname, csr, contact, notes } => {
                botauth::hostname::validate(&hostname).map_err(anyhow::Error::msg)?;
                let csr_pem = std::fs::read_to_string(&csr).with_context(|| format!("reading {}", csr.display()))?;
                let v = call(&remote, http::Method::POST, "/api/requests", Some(serde_json::json!({"hostname": hostname, "csr_pem": csr_pem, "contact": contact, "notes": notes})), false).await?;
                println!("request {} submitted; keep its secret: {}", v["id"], v["secret"].as_str().unwrap_or(""));
                println!("check it with: farmer request status {} --secret {} --out {hostname}.crt", v["id"], v["secret"].as_str().unwrap_or(""));
            }
            RequestCmd::Status { remote, id, secret, out } => {
                let v = call_with(&remote, http::Method::GET, &format!("/api/requests/{id}"), None, false, Some(&secret)).await?;
                let status = v["status"].as_str().unwrap_or("");
                match status {
                    "approved" => {
                        println!("request {id} approved as {}", v["host_type"].as_str().unwrap_or(""));
                        if let Some(out) = out {
                            std::fs::write(&out, v["cert_pem"].as_str().unwrap_or("")).with_context(|| format!("writing {}", out.display()))?;
                            println!("wrote the certificate to {}", out.display());
                        }
                    }
                    "rejected" => bail!("request {id} was rejected: {}", v["reason"].as_str().unwrap_or("")),
                    s => println!("request {id} is {s}"),
                }
            }
            RequestCmd::List { remote } => {
                let v = call(&remote, http::Method::GET, "/api/requests", None, true).await?;
                for r in v.as_array().into_iter().flatten() {
                    println!("{:>4}  {:<10} {:<30} {}  {}", r["id"], r["status"].as_str().unwrap_or(""), r["hostname"].as_str().unwrap_or(""), r["contact"].as_str().unwrap_or(""), r["notes"].as_str().unwrap_or(""));
                }
            }
            RequestCmd::Approve { remote, id, host_type } => {
                let v = call(&remote, http::Method::POST, &format!("/api/requests/{id}/approve"), Some(serde_json::json!({"host_type": host_type})), true).await?;
                println!("approved request {id}: {} is now {} (certificate serial {})", v["hostname"].as_str().unwrap_or(""), host_type, v["serial"].as_str().unwrap_or(""));
            }
            RequestCmd::Reject { remote, id, reason } => {
                call(&remote, http::Method::POST, &format!("/api/requests/{id}/reject"), Some(serde_json::json!({"reason": reason})), true).await?;
                println!("rejected request {id}");
            }
        }
        Ok(())
    })
}

pub fn run_ca(cmd: CaCmd) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cmd {
            CaCmd::Revoke { remote, serial, hostname, reason } => {
                if serial.is_none() && hostname.is_none() {
                    bail!("give --serial or --hostname");
                }
                let v = call(&remote, http::Method::POST, "/api/ca/revoke", Some(serde_json::json!({"serial": serial, "hostname": hostname, "reason": reason})), true).await?;
                println!("revoked serial {} ({})", v["serial"].as_str().unwrap_or(""), v["hostname"].as_str().unwrap_or(""));
            }
        }
        Ok(())
    })
}
