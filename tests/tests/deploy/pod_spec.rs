//! The DaemonSet, field by field: least privilege, host mounts, probes, rollout, scheduling.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

use crate::kube::{
    METRICS_PORT, VARIANTS, agent_container, daemonset, find, kube_dir, read, rendered, strs,
};

/// Capabilities the DaemonSet may add. BPF and NET_ADMIN are the issue's; anything else must be
/// proven necessary by caps.rs (the agent fails without it) and justified in daemonset.yaml.
/// Adding one to the manifest means adding it here, on purpose.
pub const JUSTIFIED_CAPS: &[&str] = &["BPF", "NET_ADMIN", "PERFMON"];

/// Each added capability has a comment right above it in daemonset.yaml saying why.
#[test]
fn every_added_capability_is_justified_in_a_comment() {
    let text = read(&kube_dir().join("base/daemonset.yaml"));
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    for cap in JUSTIFIED_CAPS {
        let at = lines
            .iter()
            .position(|l| *l == format!("- {cap}"))
            .unwrap_or_else(|| panic!("daemonset.yaml does not add {cap} as `- {cap}`"));
        assert!(
            lines[at - 1].starts_with('#') && lines[at - 1].len() > 20,
            "daemonset.yaml: `- {cap}` has no comment justifying it"
        );
    }
}

#[test]
fn daemonset_security_context_is_least_privilege() {
    for v in VARIANTS {
        let docs = rendered(v);
        let ds = daemonset(&docs);
        let pod = &ds["spec"]["template"]["spec"];
        let c = agent_container(ds);
        let sc = &c["securityContext"];
        assert_eq!(sc["privileged"], false, "{v}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{v}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{v}");
        assert_eq!(
            sc["runAsUser"], 0,
            "{v}: root, so the added capabilities survive the exec"
        );
        assert_eq!(sc["runAsNonRoot"], false, "{v}");
        assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"], "{v}");
        let added: BTreeSet<&str> = strs(&sc["capabilities"]["add"]).into_iter().collect();
        let justified: BTreeSet<&str> = JUSTIFIED_CAPS.iter().copied().collect();
        assert_eq!(added, justified, "{v}: capabilities added");
        // Set for the pod; the container must not override it.
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{v}"
        );
        assert!(
            sc["seccompProfile"].is_null(),
            "{v}: container overrides seccomp"
        );
        assert_eq!(pod["hostNetwork"], true, "{v}");
        assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet", "{v}");
        for shared in ["hostPID", "hostIPC", "shareProcessNamespace"] {
            assert!(
                pod[shared].is_null() || pod[shared] == false,
                "{v}: {shared}"
            );
        }
        assert_eq!(pod["automountServiceAccountToken"], false, "{v}");
        let sa = find(
            &docs,
            "ServiceAccount",
            pod["serviceAccountName"].as_str().expect("own SA"),
        );
        assert_eq!(sa["automountServiceAccountToken"], false, "{v}");
    }
}

#[test]
fn daemonset_host_mounts_and_propagation() {
    for v in VARIANTS {
        let docs = rendered(v);
        let ds = daemonset(&docs);
        let volumes: BTreeMap<&str, &Value> = ds["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|vol| (vol["name"].as_str().unwrap(), vol))
            .collect();
        let mounts: BTreeMap<&str, &Value> = agent_container(ds)["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["mountPath"].as_str().unwrap(), m))
            .collect();
        let host = |mount: &str| -> (&Value, &Value) {
            let m = mounts
                .get(mount)
                .unwrap_or_else(|| panic!("{v}: nothing mounted at {mount}"));
            let vol = volumes[m["name"].as_str().unwrap()];
            (m, &vol["hostPath"])
        };
        // bpffs: pins live on the host's filesystem; HostToContainer, because Bidirectional is
        // only allowed for privileged containers.
        let (m, hp) = host("/sys/fs/bpf");
        assert_eq!(hp["path"], "/sys/fs/bpf");
        assert_eq!(
            hp["type"], "Directory",
            "the host's bpffs must exist, never be created"
        );
        assert_eq!(m["mountPropagation"], "HostToContainer");
        assert!(m["readOnly"].is_null() || m["readOnly"] == false);
        for dir in ["/run/wsguard", "/var/lib/wsguard"] {
            let (m, hp) = host(dir);
            assert_eq!(hp["path"], dir, "{v}");
            assert_eq!(hp["type"], "DirectoryOrCreate", "{v}");
            assert!(
                m["readOnly"].is_null() || m["readOnly"] == false,
                "{v}: {dir} is written"
            );
            assert!(m["mountPropagation"].is_null(), "{v}: {dir}");
        }
        let cfg = mounts["/etc/wsguard"];
        assert_eq!(cfg["readOnly"], true);
        assert_eq!(
            volumes[cfg["name"].as_str().unwrap()]["configMap"]["name"],
            "wsguard-config"
        );
        // Every other host path is read-only (the pod logs with log detection), and none is
        // mounted without a reason listed here.
        for (path, m) in &mounts {
            let vol = volumes[m["name"].as_str().unwrap()];
            if vol["hostPath"].is_object()
                && !["/sys/fs/bpf", "/run/wsguard", "/var/lib/wsguard"].contains(path)
            {
                assert_eq!(
                    m["readOnly"], true,
                    "{v}: host path {path} must be read-only"
                );
                assert_eq!(*path, "/var/log/pods", "{v}: unexpected host path {path}");
            }
        }
        assert_eq!(
            mounts.contains_key("/var/log/pods"),
            *v == "overlays/log-detection",
            "{v}: pod logs are mounted exactly when log detection is on"
        );
    }
}

#[test]
fn daemonset_probes_rollout_and_scheduling() {
    let docs = rendered("base");
    let ds = daemonset(&docs);
    let pod = &ds["spec"]["template"]["spec"];
    let c = agent_container(ds);
    assert_eq!(
        strs(&c["args"]),
        ["agent", "--config", "/etc/wsguard/wsguard.toml"]
    );
    assert!(
        c["command"].is_null(),
        "the image's ENTRYPOINT (wsguard) runs the args"
    );
    assert_eq!(c["image"], "wsguard:0.1.0");
    let port_of = |p: &Value| -> u64 {
        match p {
            Value::String(name) => c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|cp| cp["name"] == *name)
                .and_then(|cp| cp["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("no container port named {name}")),
            n => n.as_u64().unwrap(),
        }
    };
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(port_of(&get["port"]), METRICS_PORT, "{probe}");
        assert!(get["scheme"].is_null() || get["scheme"] == "HTTP");
    }
    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][res].is_string(),
                "resources.{kind}.{res}"
            );
        }
    }
    let strategy = &ds["spec"]["updateStrategy"];
    assert_eq!(strategy["type"], "RollingUpdate");
    assert_eq!(
        strategy["rollingUpdate"]["maxSurge"], 0,
        "never two agents on one node"
    );
    assert_eq!(strategy["rollingUpdate"]["maxUnavailable"], 1);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}]),
        "every node"
    );
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace period");
    assert!((5..=120).contains(&grace), "grace period {grace}");
}
