//! Real nginx in the node namespace, configured the way ingress-nginx proxies WebSockets, with
//! its prefix, pid file, logs and temp dirs in the lab's own directory.

use anyhow::{Result, bail};
use std::{
    fs,
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::proc::Proc;
use crate::netns::NetNs;

pub const NGINX: &str = "/usr/sbin/nginx";
/// Answered by nginx itself, so the lab can tell nginx is up without touching the backend.
pub const HEALTH_PATH: &str = "/lab-nginx-health";

pub struct Nginx {
    proc: Proc,
    pub prefix: PathBuf,
}

/// How the site's port listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Plain HTTP on the port, both families.
    Plain,
    /// What ingress-nginx renders with `use-proxy-protocol: "true"`: every connection on the
    /// port begins with a PROXY v1/v2 header, whose client becomes `$remote_addr`
    /// (`real_ip_header proxy_protocol`, trusted from anywhere like ingress-nginx's default
    /// `proxy-real-ip-cidr`). The lab checks readiness on `health_port` (127.0.0.1, plain),
    /// since nothing on the site's port answers without a header.
    ProxyProtocol { health_port: u16 },
}

/// The configuration: the WebSocket part is what ingress-nginx renders for every location.
pub fn config(prefix: &Path, backend: SocketAddr, port: u16) -> String {
    config_with(prefix, backend, port, Listen::Plain)
}

/// [`config`], with the site's port listening as `listen` says.
pub fn config_with(prefix: &Path, backend: SocketAddr, port: u16, listen: Listen) -> String {
    let p = prefix.display();
    let (listen_opts, realip, health_server, health_log) = match listen {
        Listen::Plain => (
            String::new(),
            String::new(),
            String::new(),
            "off".to_owned(),
        ),
        Listen::ProxyProtocol { health_port } => (
            " proxy_protocol".to_owned(),
            "set_real_ip_from 0.0.0.0/0;\n    set_real_ip_from ::/0;\n    \
             real_ip_header proxy_protocol;\n    "
                .to_owned(),
            format!(
                "server {{\n        listen 127.0.0.1:{health_port};\n        \
                 location = {HEALTH_PATH} {{\n            access_log off;\n            \
                 return 200 \"ok\\n\";\n        }}\n    }}\n\n    "
            ),
            // The load balancer's health checks, counted apart from client requests.
            format!("{p}/health.log lab"),
        ),
    };
    format!(
        r#"# wsguard lab: nginx in front of the echo backend, like ingress-nginx.
user root;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log info;
events {{ worker_connections 8192; }}
http {{
    log_format lab '$remote_addr $status "$request" $request_time';
    access_log {p}/access.log lab;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    upstream backend {{
        server {backend};
    }}

    {realip}{health_server}server {{
        listen {port}{listen_opts} default_server reuseport backlog=4096;
        listen [::]:{port}{listen_opts} default_server reuseport backlog=4096;

        location = {HEALTH_PATH} {{
            access_log {health_log};
            return 200 "ok\n";
        }}

        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_connect_timeout 5s;
            proxy_send_timeout 60s;
            proxy_read_timeout 60s;
            proxy_buffering off;
        }}
    }}
}}
"#
    )
}

impl Nginx {
    /// Write the config under `dir/nginx`, start nginx in `ns` and wait until it answers.
    pub fn start(ns: &NetNs, dir: &Path, backend: SocketAddr, port: u16) -> Result<Self> {
        let prefix = dir.join("nginx");
        let conf = config(&prefix, backend, port);
        Self::launch(ns, dir, "nginx", prefix, &conf, port)
    }

    /// Like [`Nginx::start`], with the site's port listening as `listen` says.
    pub fn start_with(
        ns: &NetNs,
        dir: &Path,
        backend: SocketAddr,
        port: u16,
        listen: Listen,
    ) -> Result<Self> {
        let prefix = dir.join("nginx");
        let conf = config_with(&prefix, backend, port, listen);
        let ready = match listen {
            Listen::Plain => port,
            Listen::ProxyProtocol { health_port } => health_port,
        };
        Self::launch(ns, dir, "nginx", prefix, &conf, ready)
    }

    /// Write `conf` under `prefix`, run nginx on it in `ns` (as `name`), wait for `ready_port`.
    fn launch(
        ns: &NetNs,
        dir: &Path,
        name: &str,
        prefix: PathBuf,
        conf: &str,
        ready_port: u16,
    ) -> Result<Self> {
        fs::create_dir_all(prefix.join("tmp"))?;
        let conf_path = prefix.join("nginx.conf");
        fs::write(&conf_path, conf)?;
        let (conf_s, prefix_s) = (
            conf_path.display().to_string(),
            prefix.display().to_string(),
        );
        let err_log = prefix.join("error.log").display().to_string();
        // -e: the compiled-in error log (/var/log/nginx) is opened before the config is read.
        let args = [
            "-p",
            &prefix_s,
            "-e",
            &err_log,
            "-c",
            &conf_s,
            "-g",
            "daemon off;",
        ];
        let proc = Proc::spawn(ns, name, dir, Path::new(NGINX), &args)?;
        let mut nginx = Self { proc, prefix };
        nginx.wait_ready(ns, ready_port)?;
        Ok(nginx)
    }

    fn wait_ready(&mut self, ns: &NetNs, port: u16) -> Result<()> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let up = ns.run(move || health(SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port)))?;
            if up {
                return Ok(());
            }
            if !self.proc.running() {
                bail!(
                    "nginx exited at start:\n{}{}",
                    self.proc.err_text(),
                    self.error_log()
                );
            }
            if Instant::now() > end {
                bail!("nginx did not answer within 10s:\n{}", self.error_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn access_log(&self) -> String {
        fs::read_to_string(self.prefix.join("access.log")).unwrap_or_default()
    }

    /// Health checks answered on the site's port (logged only behind `Listen::ProxyProtocol`),
    /// one line each: `$remote_addr $status …`.
    pub fn health_log(&self) -> String {
        fs::read_to_string(self.prefix.join("health.log")).unwrap_or_default()
    }

    pub fn error_log(&self) -> String {
        fs::read_to_string(self.prefix.join("error.log")).unwrap_or_default()
    }

    /// Access-log lines of requests from `addr` (nginx logs a WebSocket when it closes).
    pub fn requests_from(&self, addr: IpAddr) -> usize {
        let me = addr.to_string();
        self.access_log()
            .lines()
            .filter(|l| l.split(' ').next() == Some(me.as_str()))
            .count()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Fast shutdown; the process group kill in Proc's drop catches a stuck worker.
        self.proc.signal(libc::SIGTERM);
        let _ = self.proc.wait(Duration::from_secs(5));
        self.proc.signal(libc::SIGKILL);
    }
}

/// One GET of the health path; true on a 200.
fn health(addr: SocketAddr) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let req = format!("GET {HEALTH_PATH} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    super::http::response_status(&buf[..n]) == Some(200)
}

/// How a TLS site writes its access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessFormat {
    /// ingress-nginx's default `upstreaminfo` format.
    IngressNginx,
    /// A JSON object per line (`escape=json`), with ingress-nginx's usual field names.
    Json,
}

/// A TLS server in front of the backend, as ingress-nginx terminates wss://.
#[derive(Debug, Clone)]
pub struct TlsSite {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The TLS port (all addresses).
    pub port: u16,
    /// A plain-HTTP port on 127.0.0.1 answering only the health path, so start-up can be
    /// checked without TLS.
    pub health_port: u16,
    pub format: AccessFormat,
}

/// The TLS configuration: like [`config`], with the access log in `site.format`.
pub fn tls_config(prefix: &Path, backend: SocketAddr, site: &TlsSite) -> String {
    let p = prefix.display();
    let (cert, key) = (site.cert.display(), site.key.display());
    let (port, health) = (site.port, site.health_port);
    // $proxy_upstream_name and $req_id are ingress-nginx's own variables; defined here the
    // way ingress-nginx fills them so the line has exactly its shape.
    let format = match site.format {
        AccessFormat::IngressNginx => {
            r#"log_format upstreaminfo '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent" $request_length $request_time [$proxy_upstream_name] [$proxy_alternative_upstream_name] $upstream_addr $upstream_response_length $upstream_response_time $upstream_status $req_id';"#
        }
        AccessFormat::Json => {
            r#"log_format upstreaminfo escape=json '{"time":"$time_iso8601","remote_addr":"$remote_addr","request":"$request","request_uri":"$request_uri","status":$status,"http_x_forwarded_for":"$http_x_forwarded_for","upstream_addr":"$upstream_addr","req_id":"$req_id"}';"#
        }
    };
    format!(
        r#"# wsguard lab: nginx terminating TLS in front of the echo backend, like ingress-nginx.
user root;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log info;
events {{ worker_connections 8192; }}
http {{
    map $host $proxy_upstream_name {{ default "default-echo-80"; }}
    map $host $proxy_alternative_upstream_name {{ default ""; }}
    map $request_id $req_id {{ default $request_id; }}
    {format}
    access_log {p}/access.log upstreaminfo;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    upstream backend {{
        server {backend};
    }}

    server {{
        listen 127.0.0.1:{health};
        location = {HEALTH_PATH} {{
            access_log off;
            return 200 "ok\n";
        }}
    }}

    server {{
        listen {port} ssl default_server reuseport backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};

        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_connect_timeout 5s;
            proxy_read_timeout 60s;
            proxy_buffering off;
        }}
    }}
}}
"#
    )
}

impl Nginx {
    /// A TLS nginx under `dir/nginx-tls` (next to the lab's plain one), started in `ns`.
    pub fn start_tls(ns: &NetNs, dir: &Path, backend: SocketAddr, site: &TlsSite) -> Result<Self> {
        let prefix = dir.join("nginx-tls");
        let conf = tls_config(&prefix, backend, site);
        Self::launch(ns, dir, "nginx-tls", prefix, &conf, site.health_port)
    }
}
