//! A real smart-HTTP git server over TLS on loopback: Debian's nginx with
//! basic auth in front of `git http-backend` through fcgiwrap, as forges
//! and self-hosted git servers serve repositories.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Stopped;

pub struct GitServer {
    pub dir: PathBuf,
    /// `https://127.0.0.1:PORT`
    pub base: String,
    /// The server's certificate (PEM), to trust as the repo's `ca_file`.
    pub ca: PathBuf,
    /// Bare repositories served at `BASE/git/NAME.git`.
    pub repos: PathBuf,
    _nginx: Stopped,
    _fcgi: Stopped,
}

fn need(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install {package} (scripts/test does)"
    );
}

impl GitServer {
    /// Serves repositories under `dir/repos` to `user`:`password`.
    pub fn start(dir: &Path, user: &str, password: &str) -> GitServer {
        need("/usr/sbin/nginx", "nginx-light");
        need("/usr/sbin/fcgiwrap", "fcgiwrap");
        let repos = dir.join("repos");
        std::fs::create_dir_all(&repos).unwrap();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "openssl req failed");
        let hash = super::openssl(&["passwd", "-apr1", "-stdin"], password.as_bytes());
        std::fs::write(
            dir.join("htpasswd"),
            format!("{user}:{}", String::from_utf8_lossy(&hash).trim()),
        )
        .unwrap();
        let sock = dir.join("fcgi.sock");
        let fcgi = Stopped(
            Command::new("/usr/sbin/fcgiwrap")
                .arg("-s")
                .arg(format!("unix:{}", sock.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group0()
                .spawn()
                .unwrap(),
        );
        let exec_path = String::from_utf8(
            Command::new("git")
                .arg("--exec-path")
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let backend = Path::new(exec_path.trim()).join("git-http-backend");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let d = dir.display();
        let user_line = if unsafe { libc::geteuid() } == 0 {
            "user root;"
        } else {
            ""
        };
        let conf = format!(
            r#"daemon off;
{user_line}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body;
  fastcgi_temp_path {d}/tmp/fcgi;
  proxy_temp_path {d}/tmp/proxy;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {d}/cert.pem;
    ssl_certificate_key {d}/key.pem;
    location /junk/ {{ default_type text/plain; return 200 "this is not a git server\n"; }}
    location ~ ^/git(/.*)$ {{
      auth_basic "git";
      auth_basic_user_file {d}/htpasswd;
      client_max_body_size 0;
      fastcgi_pass unix:{sock};
      fastcgi_param SCRIPT_FILENAME {backend};
      fastcgi_param GIT_PROJECT_ROOT {repos};
      fastcgi_param GIT_HTTP_EXPORT_ALL "";
      fastcgi_param PATH_INFO $1;
      fastcgi_param REMOTE_USER $remote_user;
      fastcgi_param QUERY_STRING $query_string;
      fastcgi_param REQUEST_METHOD $request_method;
      fastcgi_param CONTENT_TYPE $content_type;
      fastcgi_param CONTENT_LENGTH $content_length;
      fastcgi_param SERVER_PROTOCOL $server_protocol;
      fastcgi_param GATEWAY_INTERFACE CGI/1.1;
    }}
  }}
}}
"#,
            sock = sock.display(),
            backend = backend.display(),
            repos = repos.display(),
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let nginx = Stopped(
            Command::new("/usr/sbin/nginx")
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .arg("-p")
                .arg(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group0()
                .spawn()
                .unwrap(),
        );
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() || !sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nginx did not listen: {}",
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        GitServer {
            dir: dir.to_path_buf(),
            base: format!("https://127.0.0.1:{port}"),
            ca: cert,
            repos,
            _nginx: nginx,
            _fcgi: fcgi,
        }
    }

    /// Publishes the work-tree repository `src` as `NAME.git` (a bare
    /// mirror the server serves); call again to push new commits.
    pub fn publish(&self, src: &Path, name: &str) -> String {
        let bare = self.repos.join(format!("{name}.git"));
        if !bare.exists() {
            super::git(
                &self.repos,
                &["init", "--bare", "--quiet", &format!("{name}.git")],
            );
        }
        super::git(
            src,
            &[
                "push",
                "--quiet",
                "--force",
                bare.to_str().unwrap(),
                "refs/heads/*:refs/heads/*",
            ],
        );
        format!("{}/git/{name}.git", self.base)
    }
}

trait Group {
    fn process_group0(&mut self) -> &mut Self;
}

impl Group for Command {
    fn process_group0(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt;
        self.process_group(0)
    }
}
