//! overlays/crowdsec (issue 13): the Secret with every node's LAPI credentials, the DaemonSet
//! giving the agent its node name and the Secret as files, and a `[crowdsec]` config the agent
//! accepts, each node picking its own credentials with `${NODE_NAME}`.

use std::{path::PathBuf, sync::OnceLock};

use crate::{
    config::agent_config,
    kube::{agent_container, config_text, daemonset, find, rendered},
};

/// Where the DaemonSet mounts the Secret.
const MOUNT: &str = "/etc/wsguard/crowdsec";
const NODE: &str = "test-node";

/// `text` with the Secret's mount path pointing at a directory holding `test-node`'s
/// credentials, as the kubelet would lay them out, and NODE_NAME set as the Downward API does.
pub fn with_node_credentials(text: &str) -> String {
    if !text.contains(MOUNT) {
        return text.to_owned();
    }
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = tempfile::tempdir().expect("tempdir").keep();
        std::fs::write(d.join(format!("{NODE}.bouncer-key")), "0123456789abcdef\n").unwrap();
        std::fs::write(
            d.join(format!("{NODE}.machine-password")),
            "pw-of-the-node\n",
        )
        .unwrap();
        // SAFETY: set once, before any reader of NODE_NAME in this test binary.
        unsafe { std::env::set_var("NODE_NAME", NODE) };
        d
    });
    text.replace(MOUNT, &dir.display().to_string())
}

#[test]
fn crowdsec_overlay_gives_each_node_its_own_credentials() {
    let docs = rendered("overlays/crowdsec");
    let text = config_text(&docs);
    for key in ["api_key_file", "password_file"] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in [crowdsec]"));
        assert!(
            line.contains(MOUNT) && line.contains("${NODE_NAME}"),
            "{key} picks the node's own file from the Secret: {line}"
        );
    }
    let cfg = agent_config(&text, "overlays/crowdsec");
    let cs = cfg.crowdsec.expect("[crowdsec] kept");
    assert_eq!(cs.api_key.as_deref(), Some("0123456789abcdef"));
    let m = cs.machine.expect("machine credentials");
    assert_eq!(m.id, format!("wsguard-{NODE}"));
    assert_eq!(m.password.as_deref(), Some("pw-of-the-node"));
    assert!(cs.push, "publishes the node's bans");
    assert_eq!(cs.scopes, ["ip", "range"]);

    let c = agent_container(daemonset(&docs));
    let env = c["env"].as_array().expect("env");
    assert!(
        env.iter().any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
        "NODE_NAME from the Downward API: {env:?}"
    );
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == MOUNT)
        .expect("the Secret is mounted");
    assert_eq!(mount["readOnly"], true);
    let vol = daemonset(&docs)["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("its volume")
        .clone();
    assert_eq!(vol["secret"]["secretName"], "wsguard-crowdsec");
    let secret = find(&docs, "Secret", "wsguard-crowdsec");
    let keys: Vec<&String> = secret["stringData"]
        .as_object()
        .expect("stringData")
        .keys()
        .collect();
    for k in &keys {
        let node = k
            .strip_suffix(".bouncer-key")
            .or_else(|| k.strip_suffix(".machine-password"))
            .unwrap_or_else(|| panic!("{k}: NODE.bouncer-key or NODE.machine-password"));
        for want in [".bouncer-key", ".machine-password"] {
            assert!(
                keys.iter().any(|x| **x == format!("{node}{want}")),
                "{node} has no {want}"
            );
        }
    }
    // The base has no LAPI.
    assert!(
        agent_config(&config_text(&rendered("base")), "base")
            .crowdsec
            .is_none()
    );
}
