//! The agent config inside the ConfigMap, read by the agent's own parser and validator
//! (`wsguard::config`), exactly as `wsguard agent --config /etc/wsguard/wsguard.toml` reads it.

use std::collections::BTreeSet;
use wsguard::addr::Cidr;
use wsguard::config::{AgentArgs, AgentConfig, FileConfig, LogFormat};

use crate::kube::{
    METRICS_PORT, VARIANTS, agent_container, config_text, daemonset, product, rendered,
};

/// `--flag` names of `wsguard agent` in PRODUCT.md, as config keys.
fn product_config_keys() -> BTreeSet<String> {
    let p = product();
    let agent = p
        .split("wsguard agent [--config FILE]")
        .nth(1)
        .expect("PRODUCT.md: Agent section");
    let block = agent.split("```").next().unwrap();
    let keys: BTreeSet<String> = block
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|l| l.split_whitespace().next().unwrap().replace('-', "_"))
        .collect();
    assert!(
        keys.len() >= 15 && keys.contains("pin_dir"),
        "PRODUCT.md flags: {keys:?}"
    );
    keys
}

/// What the agent runs with, given `text` as its config file and the DaemonSet's args (only
/// `--config`). The interface is the default route's, which a test cannot know: "eth0".
pub fn agent_config(text: &str, what: &str) -> AgentConfig {
    let text = crate::crowdsec::with_node_credentials(text);
    let file =
        FileConfig::parse(&text).unwrap_or_else(|e| panic!("{what}: the agent rejects it: {e}"));
    merged(&file, what)
}

fn merged(file: &FileConfig, what: &str) -> AgentConfig {
    let args = AgentArgs {
        config: Some("/etc/wsguard/wsguard.toml".into()),
        ..Default::default()
    };
    AgentConfig::merge(file, &args, || Some("eth0".into()))
        .unwrap_or_else(|e| panic!("{what}: the agent refuses to start: {e}"))
}

/// `# key = value` lines: settings documented but left at the agent's default.
fn commented_examples(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("# "))
        .filter_map(|l| {
            let (k, _) = l.split_once(" = ")?;
            (!k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                .then(|| (k.to_owned(), l.to_owned()))
        })
        .collect()
}

#[test]
fn configmap_configs_are_accepted_by_the_agent_and_fit_the_daemonset() {
    for v in VARIANTS {
        let docs = rendered(v);
        let cfg = agent_config(&config_text(&docs), v);
        assert!(
            !cfg.detach_on_exit,
            "{v}: pins must outlive the pod (detach_on_exit = false)"
        );
        assert_eq!(
            cfg.log_format,
            LogFormat::Json,
            "{v}: cluster log collectors"
        );
        // The probes and the Service reach the metrics listener on the node's addresses.
        let metrics = cfg.metrics_addr.expect("metrics on: the probes need them");
        assert_eq!(u64::from(metrics.port()), METRICS_PORT, "{v}");
        assert!(
            metrics.ip().is_unspecified(),
            "{v}: kubelet probes the node address"
        );
        // Paths the agent writes live on the DaemonSet's host mounts.
        let mounts: Vec<&str> = agent_container(daemonset(&docs))["volumeMounts"]
            .as_array()
            .expect("volumeMounts")
            .iter()
            .map(|m| m["mountPath"].as_str().expect("mountPath"))
            .collect();
        for (what, path, parent) in [
            ("socket", &cfg.socket, "/run/wsguard"),
            ("state_dir", &cfg.state_dir, "/var/lib/wsguard"),
            ("pin_dir", &cfg.pin_dir, "/sys/fs/bpf"),
        ] {
            assert!(
                path.starts_with(parent),
                "{v}: {what} {} under {parent}",
                path.display()
            );
            assert!(
                mounts.contains(&parent),
                "{v}: {parent} is mounted from the host"
            );
        }
    }
}

/// The base ConfigMap is the documented default: it restates the agent's built-in defaults
/// (except the log format), and documents every PRODUCT.md key, set or as a commented example
/// that the agent accepts when uncommented.
#[test]
fn base_configmap_documents_the_agent_defaults() {
    let keys = product_config_keys();
    let text = config_text(&rendered("base"));
    let cfg = agent_config(&text, "base");
    let defaults = merged(&FileConfig::default(), "no config file");
    assert_eq!(
        AgentConfig {
            log_format: defaults.log_format,
            ..cfg
        },
        defaults,
        "the base ConfigMap changes a default other than log_format"
    );
    let set: toml::Table = toml::from_str(&text).unwrap();
    let commented = commented_examples(&text);
    for (k, line) in &commented {
        assert!(
            keys.contains(k),
            "commented key `{k}` is not a PRODUCT.md agent key"
        );
        assert!(!set.contains_key(k), "`{k}` is both set and commented out");
        agent_config(line, &format!("the example `{line}`"));
    }
    for k in &keys {
        assert!(
            set.contains_key(k) || commented.iter().any(|(c, _)| c == k),
            "`{k}` is undocumented in the base ConfigMap"
        );
    }
}

#[test]
fn bad_config_values_are_refused_by_the_agent_naming_them() {
    // The test above would be worthless if the parser accepted anything.
    let base = config_text(&rendered("base"));
    for (from, to, named) in [
        ("threshold = 20", "threshold = 0", "threshold"),
        ("window = \"10s\"", "window = \"10 parsecs\"", "10 parsecs"),
        ("mode = \"enforce\"", "mode = \"block\"", "block"),
        ("allow = []", "allow = [\"10.0.0.0/33\"]", "10.0.0.0/33"),
        (
            "# proxy_protocol_from = [\"10.0.0.0/24\"]",
            "proxy_protocol_from = [\"0.0.0.0/0\"]",
            "0.0.0.0/0",
        ),
        (
            "detach_on_exit = false",
            "detach_on_exit = false\nbogus = 1",
            "bogus",
        ),
    ] {
        assert!(base.contains(from), "base ConfigMap has no `{from}`");
        let text = base.replace(from, to);
        let err = FileConfig::parse(&text)
            .map_err(|e| e.to_string())
            .and_then(|f| {
                AgentConfig::merge(&f, &AgentArgs::default(), || Some("eth0".into()))
                    .map_err(|e| e.to_string())
            })
            .expect_err(&format!("the agent accepted `{to}`"));
        assert!(
            err.contains(named),
            "`{to}`: error {err:?} does not name {named}"
        );
    }
}

#[test]
fn cloud_lb_overlay_allowlists_health_checkers_and_cluster_ranges() {
    let base = agent_config(&config_text(&rendered("base")), "base");
    let text = config_text(&rendered("overlays/cloud-lb"));
    let lb = agent_config(&text, "overlays/cloud-lb");
    let allow: Vec<String> = lb.allow.iter().map(ToString::to_string).collect();
    for range in ["35.191.0.0/16", "130.211.0.0/22", "168.63.129.16/32"] {
        let want: Cidr = range.parse().unwrap();
        assert!(
            lb.allow.contains(&want),
            "{range}: a cloud health checker, in {allow:?}"
        );
    }
    for what in ["Node range", "Pod range", "VPC", "use-proxy-protocol"] {
        assert!(text.contains(what), "the overlay explains the {what} entry");
    }
    assert!(lb.allow.len() > 3, "cluster ranges too: {allow:?}");
    // Behind a PROXY-protocol LB the LB is a trusted sender, not an allowlist entry: the
    // allowlist would give up protection on the path that carries the traffic.
    assert!(
        !lb.proxy_protocol_from.is_empty(),
        "the overlay trusts the LB's PROXY headers"
    );
    for p in &lb.proxy_protocol_from {
        assert!(
            p.prefix_len() >= 16 && !lb.allow.iter().any(|a| a.overlaps(p)),
            "{p}: a narrow trusted sender range, not also allowlisted ({allow:?})"
        );
    }
    // Apart from `allow` and `proxy_protocol_from`, the overlay keeps the base's settings.
    assert_eq!(
        AgentConfig {
            allow: base.allow.clone(),
            proxy_protocol_from: base.proxy_protocol_from.clone(),
            ..lb
        },
        base,
        "cloud-lb changed something besides allow and proxy_protocol_from"
    );
}
