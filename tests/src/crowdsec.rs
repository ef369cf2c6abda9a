//! A real CrowdSec Local API (Debian's crowdsec 1.4.6) for the tests: its own config and
//! SQLite database in a temp dir, run as `crowdsec -c CFG -no-cs` inside a lab namespace
//! (so it listens on a private :8080 and nothing clashes between parallel tests), bouncers
//! and machines registered with `cscli`, killed with its process group on drop.

pub mod cluster;
pub mod fake;

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    lab::proc::Proc,
    netns::{NetNs, run_with_timeout},
};

/// Where LAPI listens inside its namespace.
pub const PORT: u16 = 8080;
/// The machine `cscli decisions add/delete` authenticates as.
const CLI_MACHINE: &str = "tests-cscli";

pub struct Lapi {
    proc: Option<Proc>,
    pub ns_name: String,
    pub config: PathBuf,
    dir: tempfile::TempDir,
}

fn config_text(dir: &Path, tls: Option<&Pki>) -> String {
    let d = dir.display();
    let (client_tls, server_tls) = match tls {
        None => (String::new(), String::new()),
        Some(p) => (
            "    insecure_skip_verify: true\n".to_owned(),
            format!(
                "    tls:\n      cert_file: {}\n      key_file: {}\n      ca_cert_path: {}\n      \
                 client_verification: VerifyClientCertIfGiven\n      bouncers_allowed_ou: [\"bouncer-ou\"]\n      \
                 agents_allowed_ou: [\"agent-ou\"]\n",
                p.server.0.display(),
                p.server.1.display(),
                p.ca.display()
            ),
        ),
    };
    format!(
        r#"common:
  daemonize: false
  log_media: stdout
  log_level: info
  working_dir: .
config_paths:
  config_dir: {d}/
  data_dir: {d}/data/
  simulation_path: {d}/simulation.yaml
  hub_dir: {d}/hub/
  index_path: {d}/hub/.index.json
  notification_dir: {d}/notifications/
  plugin_dir: /usr/lib/crowdsec/plugins/
db_config:
  type: sqlite
  db_path: {d}/data/crowdsec.db
  use_wal: true
api:
  client:
{client_tls}    credentials_path: {d}/local_api_credentials.yaml
  server:
{server_tls}
    log_level: info
    listen_uri: 0.0.0.0:{PORT}
    profiles_path: {d}/profiles.yaml
    trusted_ips: ["127.0.0.1"]
prometheus:
  enabled: false
"#
    )
}

const PROFILES: &str = r#"name: default_ip_remediation
filters:
 - Alert.Remediation == true && Alert.GetScope() == "Ip"
decisions:
 - type: ban
   duration: 4h
on_success: break
"#;

impl Lapi {
    /// Configure and start LAPI inside `ns`; wait until it accepts connections.
    pub fn start(ns: &NetNs) -> Result<Self> {
        Self::start_with(ns, None)
    }

    /// Like `start`, serving HTTPS with `tls`'s server certificate and accepting its client
    /// certificates (OU `bouncer-ou` for bouncers, `agent-ou` for machines).
    pub fn start_with(ns: &NetNs, tls: Option<&Pki>) -> Result<Self> {
        let which = Command::new("crowdsec").arg("-version").output();
        ensure!(
            which.is_ok(),
            "crowdsec is not installed: run `cargo xtask` (it installs Debian's crowdsec for the tests)"
        );
        let dir = tempfile::Builder::new().prefix("wsguard-lapi-").tempdir()?;
        for sub in ["data", "hub", "notifications"] {
            std::fs::create_dir_all(dir.path().join(sub))?;
        }
        std::fs::write(dir.path().join("simulation.yaml"), "simulation: false\n")?;
        std::fs::write(dir.path().join("profiles.yaml"), PROFILES)?;
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, config_text(dir.path(), tls))?;
        let mut lapi = Self {
            proc: None,
            ns_name: ns.name().to_owned(),
            config,
            dir,
        };
        let creds = lapi.dir.path().join("local_api_credentials.yaml");
        lapi.cscli_ok(&[
            "machines",
            "add",
            CLI_MACHINE,
            "--password",
            "tests-cscli-password",
            "-f",
            &creds.display().to_string(),
        ])?;
        // cscli talks to LAPI from inside the namespace, over its loopback.
        std::fs::write(
            &creds,
            format!(
                "url: {}://127.0.0.1:{PORT}\nlogin: {CLI_MACHINE}\npassword: tests-cscli-password\n",
                if tls.is_some() { "https" } else { "http" }
            ),
        )?;
        lapi.spawn(ns)?;
        Ok(lapi)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self, ns: &NetNs) -> Result<()> {
        let cfg = self.config.display().to_string();
        let p = Proc::spawn(
            ns,
            "crowdsec",
            self.dir.path(),
            Path::new("crowdsec"),
            &["-c", &cfg, "-no-cs"],
        )?;
        self.proc = Some(p);
        self.wait_listening(ns)
    }

    fn wait_listening(&mut self, ns: &NetNs) -> Result<()> {
        let end = Instant::now() + Duration::from_secs(30);
        let addr: SocketAddr = ([127, 0, 0, 1], PORT).into();
        loop {
            let up = ns.run(move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })?;
            if up {
                return Ok(());
            }
            if let Some(p) = self.proc.as_mut()
                && !p.running()
            {
                bail!("crowdsec exited at start:\n{}", p.err_text());
            }
            ensure!(
                Instant::now() < end,
                "LAPI did not listen within 30s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: LAPI is gone (the database stays).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Start again on the same database.
    pub fn restart(&mut self, ns: &NetNs) -> Result<()> {
        self.kill();
        self.spawn(ns)
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.err_text()).unwrap_or_default()
    }

    /// `cscli -c CFG ARGS` inside LAPI's namespace; the output whatever the exit.
    pub fn cscli(&self, args: &[&str]) -> Result<std::process::Output> {
        run_with_timeout(
            Command::new("ip")
                .args(["netns", "exec", &self.ns_name, "cscli", "-c"])
                .arg(&self.config)
                .args(args),
            Duration::from_secs(120),
        )
    }

    /// `cscli ARGS`, which must succeed; its stdout.
    pub fn cscli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cscli(args)?;
        if !out.status.success() {
            bail!(
                "cscli {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Register a bouncer; its API key.
    pub fn add_bouncer(&self, name: &str) -> Result<String> {
        let key = self.cscli_ok(&["bouncers", "add", name, "-o", "raw"])?;
        let key = key.trim().to_owned();
        ensure!(
            !key.is_empty() && !key.contains(char::is_whitespace),
            "no key: {key:?}"
        );
        Ok(key)
    }

    /// Register a validated machine with this password.
    pub fn add_machine(&self, name: &str, password: &str) -> Result<()> {
        let f = self.dir().join(format!("machine-{name}.yaml"));
        self.cscli_ok(&[
            "machines",
            "add",
            name,
            "--password",
            password,
            "-f",
            &f.display().to_string(),
        ])
        .map(drop)
    }

    /// `cscli decisions list -a -o json`, flattened to the decisions (each with its
    /// alert's fields under `alert`).
    pub fn decisions(&self) -> Result<Vec<Value>> {
        let text = self.cscli_ok(&["decisions", "list", "-a", "-o", "json", "--limit", "0"])?;
        let alerts: Value = match text.trim() {
            "" | "null" => return Ok(Vec::new()),
            t => serde_json::from_str(t).with_context(|| format!("cscli printed {t}"))?,
        };
        let mut out = Vec::new();
        for a in alerts.as_array().cloned().unwrap_or_default() {
            for d in a["decisions"].as_array().cloned().unwrap_or_default() {
                let mut d = d;
                d["alert"] = a.clone();
                out.push(d);
            }
        }
        Ok(out)
    }

    /// The active decisions of `value` (address or range text).
    pub fn decisions_of(&self, value: &str) -> Result<Vec<Value>> {
        Ok(self
            .decisions()?
            .into_iter()
            .filter(|d| d["value"].as_str() == Some(value))
            .collect())
    }

    /// The agent's `[crowdsec]` table for this LAPI at `url`.
    pub fn agent_config(url: &str, key: &str, extra: &str) -> String {
        format!("[crowdsec]\napi_url = \"{url}\"\napi_key = \"{key}\"\n{extra}\n")
    }
}

impl Drop for Lapi {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test CA and the certificates of a TLS LAPI test, made with openssl (P-256).
pub struct Pki {
    pub ca: PathBuf,
    /// LAPI's certificate and key (SANs: the given addresses and 127.0.0.1).
    pub server: (PathBuf, PathBuf),
    /// A bouncer's client certificate and key (OU `bouncer-ou`).
    pub bouncer: (PathBuf, PathBuf),
    _dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = run_with_timeout(
        Command::new("/usr/bin/openssl").current_dir(dir).args(args),
        Duration::from_secs(30),
    )?;
    ensure!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Pki {
    pub fn new(server_ips: &[&str]) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("wsguard-pki-").tempdir()?;
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=wsguard-test-ca",
        ]);
        openssl(d, &a)?;
        let sans: Vec<String> = server_ips
            .iter()
            .chain(&["127.0.0.1"])
            .map(|ip| format!("IP:{ip}"))
            .collect();
        let leaf = |name: &str, subj: &str, ext: String| -> Result<(PathBuf, PathBuf)> {
            std::fs::write(d.join(format!("{name}.ext")), ext)?;
            let (key, csr, crt, extf) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.ext"),
            );
            let mut a = vec!["req"];
            a.extend(ec);
            a.extend(["-keyout", &key, "-out", &csr, "-subj", subj]);
            openssl(d, &a)?;
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-days",
                    "2",
                    "-extfile",
                    &extf,
                ],
            )?;
            Ok((d.join(crt), d.join(key)))
        };
        let server = leaf(
            "server",
            "/CN=lapi",
            format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth\n",
                sans.join(",")
            ),
        )?;
        let bouncer = leaf(
            "bouncer",
            "/OU=bouncer-ou/CN=wsguard-tls-bouncer",
            "extendedKeyUsage=clientAuth\n".into(),
        )?;
        Ok(Self {
            ca: d.join("ca.crt"),
            server,
            bouncer,
            _dir: dir,
        })
    }
}

/// Poll `f` until it says yes, every 100 ms, failing after `timeout` with `what`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let end = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        ensure!(Instant::now() < end, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
