//! Issue 8: what `deploy/` promises an operator, checked rather than only written. The
//! kustomizations are rendered (by the test's own minimal renderer, cross-checked against
//! `kubectl kustomize` where kubectl exists), validated against the Kubernetes JSON schemas with
//! `kubernetes-validate` (PyPI, installed by the bootstrap), and the DaemonSet's least-privilege
//! security context, mounts, probes and rollout are asserted field by field. The data plane is
//! loaded and made to drop a banned source with only the capabilities the DaemonSet grants.

use serde::Deserialize as _;
use serde_json::Value;
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

/// The kustomizations an operator applies; every directory under overlays/ must be listed.
const VARIANTS: &[&str] = &["base", "overlays/cloud-lb", "overlays/log-detection"];
/// An old and the newest Kubernetes release whose schemas kubernetes-validate bundles.
const KUBERNETES_VERSIONS: &[&str] = &["1.33.0", "1.35.0", "1.37.0"];
/// Capabilities the DaemonSet may add, each justified in daemonset.yaml, with their bit numbers
/// (linux/capability.h). Adding one to the manifest means adding it here, on purpose.
const JUSTIFIED_CAPS: &[(&str, u32)] = &[("BPF", 39), ("NET_ADMIN", 12)];
const METRICS_PORT: u64 = 9477;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn kube_dir() -> PathBuf {
    root().join("deploy/kubernetes")
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn product() -> String {
    let p = root().join("../shared/PRODUCT.md");
    fs::read_to_string(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: the product contract must sit beside the repository",
            p.display()
        )
    })
}

fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{what}: invalid YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_file(p: &Path) -> Vec<Value> {
    yaml_docs(&read(p), &p.display().to_string())
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a list of strings"))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// A minimal kustomize: exactly the features deploy/ uses. Anything else in a kustomization fails
// the test instead of being silently ignored.

const KUSTOMIZE_KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "components",
    "patches",
    "images",
];
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PriorityClass",
];

fn render(dir: &Path) -> Vec<Value> {
    let mut docs = Vec::new();
    apply_kustomization(dir, &mut docs);
    docs
}

fn apply_kustomization(dir: &Path, docs: &mut Vec<Value>) {
    let k = yaml_file(&dir.join("kustomization.yaml")).remove(0);
    for key in k.as_object().expect("kustomization is a map").keys() {
        assert!(
            KUSTOMIZE_KEYS.contains(&key.as_str()),
            "{}: the test's renderer does not implement `{key}`",
            dir.display()
        );
    }
    for r in strs(&k["resources"]) {
        let p = dir.join(r);
        if p.is_dir() {
            docs.extend(render(&p))
        } else {
            docs.extend(yaml_file(&p))
        }
    }
    for c in strs(&k["components"]) {
        let cdir = dir.join(c);
        let comp = yaml_file(&cdir.join("kustomization.yaml")).remove(0);
        assert_eq!(
            comp["kind"],
            "Component",
            "{} is not a Component",
            cdir.display()
        );
        apply_kustomization(&cdir, docs);
    }
    for patch in k["patches"].as_array().into_iter().flatten() {
        let path = patch["path"]
            .as_str()
            .expect("only `patches: - path:` is implemented");
        for p in yaml_file(&dir.join(path)) {
            let target = docs
                .iter_mut()
                .filter(|d| {
                    d["kind"] == p["kind"] && d["metadata"]["name"] == p["metadata"]["name"]
                })
                .collect::<Vec<_>>();
            assert_eq!(
                target.len(),
                1,
                "patch {path} must match exactly one resource"
            );
            strategic_merge(target.into_iter().next().expect("one"), &p, "");
        }
    }
    if let Some(ns) = k["namespace"].as_str() {
        for d in docs.iter_mut() {
            if !CLUSTER_SCOPED.contains(&d["kind"].as_str().unwrap_or_default()) {
                d["metadata"]["namespace"] = Value::from(ns);
            }
        }
    }
    for img in k["images"].as_array().into_iter().flatten() {
        for d in docs.iter_mut() {
            // pointer_mut, not indexing: indexing a Value mutably inserts the missing keys.
            let Some(spec) = d.pointer_mut("/spec/template/spec") else {
                continue;
            };
            for list in ["containers", "initContainers"] {
                for c in spec
                    .get_mut(list)
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    let image = c["image"].as_str().unwrap_or_default();
                    let name = image.split(['@']).next().unwrap_or_default();
                    let name = match name.rfind(':') {
                        Some(i) if !name[i..].contains('/') => &name[..i],
                        _ => name,
                    };
                    if img["name"] == name {
                        let new_name = img["newName"].as_str().unwrap_or(name);
                        c["image"] = Value::from(match img["newTag"].as_str() {
                            Some(tag) => format!("{new_name}:{tag}"),
                            None => new_name.to_owned(),
                        });
                    }
                }
            }
        }
    }
}

/// Strategic merge as Kubernetes does it for the fields deploy/ patches: maps merge, lists of
/// objects merge by their patch merge key, anything else is replaced.
fn strategic_merge(target: &mut Value, patch: &Value, field: &str) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                match t.get_mut(k) {
                    Some(tv) => strategic_merge(tv, v, k),
                    None => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(t), Value::Array(p)) => {
            let key = match field {
                "volumeMounts" => "mountPath",
                "ports" => "containerPort",
                _ => "name",
            };
            if p.iter().all(|i| i.get(key).is_some()) && t.iter().all(|i| i.get(key).is_some()) {
                for item in p {
                    match t.iter_mut().find(|i| i[key] == item[key]) {
                        Some(ti) => strategic_merge(ti, item, ""),
                        None => t.push(item.clone()),
                    }
                }
            } else {
                *t = p.clone();
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn rendered(variant: &str) -> Vec<Value> {
    render(&kube_dir().join(variant))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in the rendering"))
}

fn daemonset(docs: &[Value]) -> &Value {
    find(docs, "DaemonSet", "wsguard")
}

fn agent_container(ds: &Value) -> &Value {
    let cs = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(
        cs.len(),
        1,
        "one container: the agent, nothing else gets the host's privileges"
    );
    &cs[0]
}

fn keyed(docs: Vec<Value>) -> BTreeMap<(String, String), Value> {
    docs.into_iter()
        .map(|d| {
            let key = (
                d["kind"].as_str().unwrap_or_default().to_owned(),
                d["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            (key, d)
        })
        .collect()
}

fn kubectl_available() -> bool {
    Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
}

// ---------------------------------------------------------------------------------------------
// The manifests parse, are all used, and render the same way kustomize renders them.

#[test]
fn every_manifest_parses_and_every_overlay_is_tested() {
    let mut referenced = BTreeSet::new();
    let mut files = Vec::new();
    let mut stack = vec![kube_dir()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().map(Result::unwrap) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                files.push(p);
            }
        }
    }
    for f in &files {
        let docs = yaml_file(f);
        assert!(!docs.is_empty(), "{}: no document", f.display());
        for d in &docs {
            assert!(
                d["apiVersion"].is_string() && d["kind"].is_string(),
                "{}",
                f.display()
            );
        }
        if f.file_name().is_some_and(|n| n == "kustomization.yaml") {
            let k = &docs[0];
            let dir = f.parent().unwrap();
            for r in strs(&k["resources"]) {
                referenced.insert(dir.join(r).canonicalize().unwrap());
            }
            for p in k["patches"].as_array().into_iter().flatten() {
                referenced.insert(
                    dir.join(p["path"].as_str().unwrap())
                        .canonicalize()
                        .unwrap(),
                );
            }
        }
    }
    for f in files.iter().filter(|f| !f.ends_with("kustomization.yaml")) {
        assert!(
            referenced.contains(&f.canonicalize().unwrap()),
            "{} is in no kustomization: it would never be applied",
            f.display()
        );
    }
    let overlays: BTreeSet<String> = fs::read_dir(kube_dir().join("overlays"))
        .unwrap()
        .map(|e| format!("overlays/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    for o in &overlays {
        assert!(
            VARIANTS.contains(&o.as_str()),
            "{o} is not in VARIANTS: it would go unvalidated"
        );
    }
}

#[test]
fn renderer_matches_kubectl_kustomize() {
    if !kubectl_available() {
        println!("kubectl not found: the test's own rendering is the only one checked");
        return;
    }
    for v in VARIANTS {
        let out = Command::new("kubectl")
            .args(["kustomize"])
            .arg(kube_dir().join(v))
            .output()
            .expect("run kubectl kustomize");
        assert!(
            out.status.success(),
            "kubectl kustomize {v}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs = keyed(yaml_docs(&String::from_utf8_lossy(&out.stdout), v));
        let ours = keyed(rendered(v));
        assert_eq!(
            theirs.keys().collect::<Vec<_>>(),
            ours.keys().collect::<Vec<_>>(),
            "{v}"
        );
        for (k, d) in &ours {
            assert_eq!(
                &theirs[k], d,
                "{v}: {k:?} renders differently from kubectl kustomize"
            );
        }
    }
}

#[test]
fn rendered_manifests_validate_against_kubernetes_schemas() {
    let probe = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        panic!(
            "\n\n!!! kubernetes-validate is MISSING: the manifests were NOT validated against the \
             Kubernetes schemas.\n!!! `cargo xtask test` installs it; by hand: \
             python3 -m pip install kubernetes-validate==1.37.0\n\n"
        );
    }
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("deploy-validate");
    fs::create_dir_all(&tmp).unwrap();
    for v in VARIANTS {
        // ServiceMonitor is a CRD kubernetes-validate has no schema for: checked structurally in
        // servicemonitor_scrapes_the_agents_metrics_port.
        let docs: Vec<Value> = rendered(v)
            .into_iter()
            .filter(|d| d["kind"] != "ServiceMonitor")
            .collect();
        let text = docs
            .iter()
            .map(|d| serde_norway::to_string(d).unwrap())
            .collect::<Vec<_>>()
            .join("---\n");
        let file = tmp.join(format!("{}.yaml", v.replace('/', "_")));
        fs::write(&file, text).unwrap();
        for k8s in KUBERNETES_VERSIONS {
            let out = Command::new("python3")
                .args(["-m", "kubernetes_validate", "--strict", "-k", k8s])
                .arg(&file)
                .output()
                .expect("run kubernetes-validate");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{v} against Kubernetes {k8s}:\n{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            // A kind without a schema only warns: insist that every document was really checked.
            let passed = stdout
                .lines()
                .filter(|l| l.starts_with("INFO") && l.contains(" passed "))
                .count();
            assert_eq!(
                passed,
                docs.len(),
                "{v} against Kubernetes {k8s}: not all validated:\n{stdout}"
            );
        }
    }
}

#[test]
fn servicemonitor_scrapes_the_agents_metrics_port() {
    for v in VARIANTS {
        let docs = rendered(v);
        let sm = find(&docs, "ServiceMonitor", "wsguard");
        assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
        let svc = find(&docs, "Service", "wsguard-metrics");
        let ds = daemonset(&docs);
        let ns = ds["metadata"]["namespace"].as_str().unwrap();
        assert_eq!(sm["metadata"]["namespace"], ns);
        assert_eq!(strs(&sm["spec"]["namespaceSelector"]["matchNames"]), [ns]);
        let want = sm["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("matchLabels");
        assert!(!want.is_empty());
        for (k, val) in want {
            assert_eq!(
                &svc["metadata"]["labels"][k], val,
                "ServiceMonitor selects the Service by {k}"
            );
        }
        let endpoints = sm["spec"]["endpoints"].as_array().expect("endpoints");
        assert_eq!(endpoints.len(), 1);
        assert_eq!(endpoints[0]["path"], "/metrics");
        let port = &svc["spec"]["ports"][0];
        assert_eq!(
            endpoints[0]["port"], port["name"],
            "endpoint names the Service's port"
        );
        assert_eq!(port["port"], METRICS_PORT);
        assert_eq!(
            svc["spec"]["clusterIP"], "None",
            "headless: one target per node"
        );
        // The Service reaches the agent pods' metrics port.
        let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
        for (k, val) in svc["spec"]["selector"].as_object().expect("selector") {
            assert_eq!(&pod_labels[k], val, "Service selects the agent pods by {k}");
        }
        let cport = &agent_container(ds)["ports"][0];
        assert_eq!(port["targetPort"], cport["name"]);
        assert_eq!(cport["containerPort"], METRICS_PORT);
    }
}

#[test]
fn namespace_is_the_only_privileged_pod_security_exemption() {
    for v in VARIANTS {
        let docs = rendered(v);
        let ns = find(&docs, "Namespace", "wsguard");
        for mode in ["enforce", "audit", "warn"] {
            assert_eq!(
                ns["metadata"]["labels"][format!("pod-security.kubernetes.io/{mode}")],
                "privileged",
                "{v}: {mode}"
            );
        }
        for d in docs.iter().filter(|d| d["kind"] != "Namespace") {
            assert_eq!(
                d["metadata"]["namespace"], "wsguard",
                "{v}: {} in the namespace",
                d["kind"]
            );
        }
        let quota = find(&docs, "ResourceQuota", "wsguard-critical-pods");
        let scope = &quota["spec"]["scopeSelector"]["matchExpressions"][0];
        assert_eq!(scope["scopeName"], "PriorityClass");
        assert_eq!(
            strs(&scope["values"]),
            [
                daemonset(&docs)["spec"]["template"]["spec"]["priorityClassName"]
                    .as_str()
                    .unwrap()
            ]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The DaemonSet, field by field.

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
        let justified: BTreeSet<&str> = JUSTIFIED_CAPS.iter().map(|(n, _)| *n).collect();
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

// ---------------------------------------------------------------------------------------------
// The agent config inside the ConfigMap.

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

fn config_of(docs: &[Value]) -> (String, toml::Table) {
    let text = find(docs, "ConfigMap", "wsguard-config")["data"]["wsguard.toml"]
        .as_str()
        .expect("data.wsguard.toml")
        .to_owned();
    let table = toml::from_str(&text).unwrap_or_else(|e| panic!("wsguard.toml: {e}"));
    (text, table)
}

fn cidr_ok(s: &str) -> bool {
    let (addr, len) = s.split_once('/').unwrap_or((s, ""));
    let Ok(ip) = addr.parse::<IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    len.is_empty() || len.parse::<u8>().is_ok_and(|l| l <= max)
}

#[test]
fn configmap_configs_use_only_product_keys_and_valid_values() {
    let keys = product_config_keys();
    for v in VARIANTS {
        let docs = rendered(v);
        let (text, cfg) = config_of(&docs);
        for k in cfg.keys() {
            assert!(keys.contains(k), "{v}: `{k}` is not a PRODUCT.md agent key");
        }
        let s = |k: &str| {
            cfg[k]
                .as_str()
                .unwrap_or_else(|| panic!("{v}: {k} is a string"))
        };
        for k in ["window", "ban_ttl", "ban_max_ttl"] {
            wsguard::duration::parse(s(k)).unwrap_or_else(|e| panic!("{v}: {k}: {e}"));
        }
        assert!(["enforce", "observe"].contains(&s("mode")));
        assert!(["auto", "native", "generic"].contains(&s("xdp_mode")));
        assert!(["text", "json"].contains(&s("log_format")));
        for k in ["threshold", "max_bans"] {
            assert!(cfg[k].as_integer().is_some_and(|n| n > 0), "{v}: {k}");
        }
        let ports = cfg["ports"].as_array().expect("ports");
        assert!(!ports.is_empty());
        assert!(
            ports
                .iter()
                .all(|p| p.as_integer().is_some_and(|p| (1..=65535).contains(&p)))
        );
        for a in cfg["allow"].as_array().expect("allow") {
            assert!(a.as_str().is_some_and(cidr_ok), "{v}: allow entry {a:?}");
        }
        assert_eq!(
            cfg["detach_on_exit"].as_bool(),
            Some(false),
            "{v}: pins must outlive the pod"
        );
        // Paths and port agree with the DaemonSet's mounts and probes.
        let metrics: SocketAddr = s("metrics_addr").parse().expect("metrics_addr");
        assert_eq!(u64::from(metrics.port()), METRICS_PORT);
        assert!(
            metrics.ip().is_unspecified(),
            "kubelet probes the node address"
        );
        let mounts: Vec<&str> = agent_container(daemonset(&docs))["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["mountPath"].as_str().unwrap())
            .collect();
        for (k, parent) in [
            ("socket", "/run/wsguard"),
            ("state_dir", "/var/lib/wsguard"),
            ("pin_dir", "/sys/fs/bpf"),
        ] {
            assert!(
                Path::new(s(k)).starts_with(parent),
                "{v}: {k} under {parent}"
            );
            assert!(
                mounts.contains(&parent),
                "{v}: {parent} mounted from the host"
            );
        }
        // Keys left unset are still documented, as commented-out examples.
        if *v == "base" {
            let commented: BTreeSet<String> = text
                .lines()
                .filter_map(|l| l.trim().strip_prefix("# "))
                .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.to_owned()))
                .collect();
            for k in &commented {
                assert!(
                    keys.contains(k),
                    "commented key `{k}` is not a PRODUCT.md agent key"
                );
            }
            for k in &keys {
                assert!(
                    cfg.contains_key(k) || commented.contains(k),
                    "`{k}` is undocumented"
                );
            }
        }
    }
}

#[test]
fn cloud_lb_overlay_allowlists_health_checkers_and_cluster_ranges() {
    let (_, base) = config_of(&rendered("base"));
    let (text, lb) = config_of(&rendered("overlays/cloud-lb"));
    let allow: Vec<&str> = lb["allow"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for range in ["35.191.0.0/16", "130.211.0.0/22", "168.63.129.16/32"] {
        assert!(allow.contains(&range), "{range}: a cloud health checker");
    }
    for what in ["Node range", "Pod range", "VPC"] {
        assert!(text.contains(what), "the overlay explains the {what} entry");
    }
    // Apart from `allow`, the overlay keeps the base's defaults.
    for (k, val) in &base {
        if k != "allow" {
            assert_eq!(lb.get(k), Some(val), "cloud-lb changed `{k}`");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The Containerfile (no container engine runs here: checked statically).

struct Instr {
    op: String,
    args: String,
}

fn containerfile() -> Vec<Vec<Instr>> {
    let text = read(&root().join("deploy/Containerfile"));
    let mut joined = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(rest) => {
                cur.push_str(rest);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                joined.push(std::mem::take(&mut cur));
            }
        }
    }
    // Stage 0 holds the global ARGs before the first FROM.
    let mut stages = vec![Vec::new()];
    for l in joined.into_iter().filter(|l| !l.trim().is_empty()) {
        let (op, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let i = Instr {
            op: op.to_uppercase(),
            args: args.trim().to_owned(),
        };
        if i.op == "FROM" {
            stages.push(Vec::new());
        }
        stages.last_mut().unwrap().push(i);
    }
    stages
}

fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("{args}: not exec form: {e}"))
}

#[test]
fn containerfile_builds_with_the_readme_bootstrap_and_ships_only_the_binary() {
    let stages = containerfile();
    let global = &stages[0];
    let from =
        |s: &[Instr]| -> Vec<String> { s[0].args.split_whitespace().map(str::to_owned).collect() };
    assert_eq!(
        stages.len(),
        4,
        "global ARGs + toolchain, build, runtime stages"
    );
    let runs = |s: &[Instr]| {
        s.iter()
            .filter(|i| i.op == "RUN")
            .map(|i| i.args.clone())
            .collect::<Vec<_>>()
            .join("\n")
    };

    // Toolchain: the Rust release rust-toolchain.toml pins, on Debian bookworm (where LLVM 22
    // comes from), bootstrapped by `cargo xtask` itself.
    let toolchain = read(&root().join("rust-toolchain.toml"));
    let channel: toml::Table = toml::from_str(&toolchain).unwrap();
    let channel = channel["toolchain"]["channel"].as_str().unwrap();
    assert!(
        global
            .iter()
            .any(|i| i.op == "ARG" && i.args == format!("RUST_VERSION={channel}")),
        "ARG RUST_VERSION={channel} (rust-toolchain.toml)"
    );
    let t = &stages[1];
    assert_eq!(
        from(t),
        [
            "docker.io/library/rust:${RUST_VERSION}-bookworm",
            "AS",
            "toolchain"
        ]
    );
    let t_runs = runs(t);
    assert!(
        t_runs.contains("cargo xtask bootstrap"),
        "the README's bootstrap"
    );
    // Cargo loads every workspace member: each one's manifest is copied into the bootstrap
    // layer, or the bootstrap fails once a member is added.
    let ws: toml::Table = toml::from_str(&read(&root().join("Cargo.toml"))).unwrap();
    let copies: Vec<&str> = t
        .iter()
        .filter(|i| i.op == "COPY")
        .map(|i| i.args.as_str())
        .collect();
    for m in ws["workspace"]["members"].as_array().unwrap() {
        let m = m.as_str().unwrap();
        assert!(
            copies
                .iter()
                .any(|c| c.starts_with(&format!("{m}/Cargo.toml "))
                    || c.starts_with(&format!("{m}/ "))),
            "toolchain stage does not copy {m}/Cargo.toml"
        );
    }
    for f in ["Cargo.toml", "Cargo.lock", "rust-toolchain.toml"] {
        assert!(
            copies.iter().any(|c| c.split_whitespace().any(|w| w == f)),
            "COPY {f}"
        );
    }

    let b = &stages[2];
    assert_eq!(from(b), ["toolchain", "AS", "build"]);
    assert!(runs(b).contains("cargo build --release --locked -p wsguard"));

    let r = &stages[3];
    let base = &from(r)[0];
    assert!(
        base.starts_with("gcr.io/distroless/cc-debian12")
            || base.starts_with("debian:bookworm-slim")
            || base.starts_with("docker.io/library/debian:bookworm-slim"),
        "small runtime base on the build's Debian release, got {base}"
    );
    assert_eq!(
        from(r)[2],
        "runtime",
        "the final stage is the runtime image"
    );
    let copies: Vec<&Instr> = r
        .iter()
        .filter(|i| i.op == "COPY" || i.op == "ADD")
        .collect();
    assert_eq!(
        copies.len(),
        1,
        "the runtime image gets the binary and nothing else"
    );
    assert_eq!(copies[0].op, "COPY");
    let words: Vec<&str> = copies[0].args.split_whitespace().collect();
    assert_eq!(
        words,
        ["--from=build", "/out/wsguard", "/usr/local/bin/wsguard"]
    );
    assert!(
        !r.iter().any(|i| i.op == "RUN"),
        "nothing runs in the runtime stage"
    );
    let last = |op: &str| {
        r.iter()
            .rfind(|i| i.op == op)
            .unwrap_or_else(|| panic!("no {op}"))
    };
    assert_eq!(last("USER").args, "0:0");
    assert_eq!(
        exec_form(&last("ENTRYPOINT").args),
        ["/usr/local/bin/wsguard"]
    );
    let cmd = exec_form(&last("CMD").args);
    assert_eq!(cmd, ["agent"], "`wsguard agent` by default");
    let ds_args = rendered("base");
    assert_eq!(
        agent_container(daemonset(&ds_args))["args"][0],
        cmd[0].as_str()
    );
    let labels = r
        .iter()
        .filter(|i| i.op == "LABEL")
        .map(|i| i.args.as_str())
        .collect::<String>();
    for l in [
        "org.opencontainers.image.title=\"wsguard\"",
        "org.opencontainers.image.version",
        "org.opencontainers.image.source",
    ] {
        assert!(labels.contains(l), "LABEL {l}");
    }
    let license = ws["workspace"]["package"]["license"].as_str().unwrap();
    assert!(labels.contains(&format!("org.opencontainers.image.licenses=\"{license}\"")));

    let ignore = read(&root().join("deploy/Containerfile.dockerignore"));
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "target/ stays out of the context"
    );
}

// ---------------------------------------------------------------------------------------------
// The Grafana dashboard uses only the metrics PRODUCT.md names.

/// Metric name -> label -> allowed values (empty when PRODUCT.md leaves them open).
fn product_metrics() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let p = product();
    let section = p.split("## Metrics").nth(1).expect("PRODUCT.md: Metrics");
    let block = section.split("```").nth(1).expect("metrics block");
    let mut out = BTreeMap::new();
    for line in block
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("wsguard_"))
    {
        let (name, rest) = line.split_once('{').unwrap_or((line, ""));
        let mut labels = BTreeMap::new();
        if let Some((label, values)) = rest.trim_end_matches('}').split_once('=') {
            let values = values.trim_matches('"');
            let set = if values.contains('…') {
                BTreeSet::new()
            } else {
                values.split('|').map(str::to_owned).collect()
            };
            labels.insert(label.to_owned(), set);
        }
        out.insert(name.to_owned(), labels);
    }
    assert!(out.len() >= 10, "PRODUCT.md metrics: {out:?}");
    out
}

fn panels(v: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in v["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(panels(p));
    }
    out
}

fn idents(expr: &str) -> Vec<&str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("wsguard_"))
        .collect()
}

#[test]
fn dashboard_queries_use_only_product_metrics_and_labels() {
    let metrics = product_metrics();
    let dash: Value =
        serde_json::from_str(&read(&root().join("deploy/grafana/wsguard-dashboard.json")))
            .expect("dashboard JSON");
    // Labels Prometheus and the ServiceMonitor add to every series.
    let target_labels = [
        "instance",
        "job",
        "node",
        "pod",
        "namespace",
        "service",
        "endpoint",
        "container",
    ];
    let mut used = BTreeSet::new();
    let mut titles = Vec::new();
    for p in panels(&dash) {
        titles.push(p["title"].as_str().unwrap_or_default().to_owned());
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("every target has a PromQL expr");
            let names = idents(expr);
            assert!(!names.is_empty(), "{expr}: queries no wsguard metric");
            let mut labels: BTreeMap<&str, &BTreeSet<String>> = BTreeMap::new();
            for n in &names {
                let m = metrics
                    .get(*n)
                    .unwrap_or_else(|| panic!("{expr}: {n} is not in PRODUCT.md"));
                labels.extend(m.iter().map(|(k, v)| (k.as_str(), v)));
                used.insert(n.to_string());
            }
            // `by (…)` groupings and `label="value"` matchers name real labels and values.
            for by in expr.split("by (").skip(1) {
                for l in by.split(')').next().unwrap().split(',').map(str::trim) {
                    assert!(
                        labels.contains_key(l) || target_labels.contains(&l),
                        "{expr}: label {l}"
                    );
                }
            }
            for sel in expr
                .split('{')
                .skip(1)
                .map(|s| s.split('}').next().unwrap())
            {
                for m in sel.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                    let (l, val) = m
                        .split_once(['=', '!'])
                        .unwrap_or_else(|| panic!("{expr}: matcher {m}"));
                    let val = val.trim_start_matches(['=', '~']).trim_matches('"');
                    match labels.get(l) {
                        Some(allowed) if !allowed.is_empty() => {
                            assert!(
                                allowed.contains(val),
                                "{expr}: {l}={val} is not a PRODUCT.md value"
                            )
                        }
                        Some(_) => {}
                        None => assert!(target_labels.contains(&l), "{expr}: label {l}"),
                    }
                }
            }
        }
    }
    let all: BTreeSet<String> = metrics.keys().cloned().collect();
    assert_eq!(used, all, "every PRODUCT.md metric is on the dashboard");
    for want in [
        "Packets by action",
        "Handshakes by verdict",
        "Bad handshakes by reason",
        "Active bans by source",
        "Ban map fill",
        "Bans refused by reason",
        "Events lost",
    ] {
        assert!(
            titles.iter().any(|t| t.starts_with(want)),
            "no panel {want:?}: {titles:?}"
        );
    }
}

#[test]
fn deploy_readme_orders_the_kill_switch_before_deleting() {
    let readme = read(&root().join("deploy/README.md"));
    for must in [
        "kubectl apply -k",
        "kubectl exec -n wsguard ds/wsguard -- wsguard ban list",
        "wsguard detach",
        "kubectl delete -k",
        "/sys/fs/bpf",
        "maxSurge",
    ] {
        assert!(
            readme.contains(must),
            "deploy/README.md does not mention `{must}`"
        );
    }
    let detach = readme.find("wsguard detach").unwrap();
    let delete = readme.find("kubectl delete -k").unwrap();
    assert!(
        detach < delete,
        "uninstall: the kill switch comes before deleting the manifests"
    );
}

// ---------------------------------------------------------------------------------------------
// The data plane with only the DaemonSet's capabilities.

const CHILD_ENV: &str = "WSGUARD_DEPLOY_CAPS_CHILD";

fn cap_mask(caps: &[&str]) -> u64 {
    caps.iter()
        .map(|c| {
            let bit = JUSTIFIED_CAPS
                .iter()
                .find(|(n, _)| n == c)
                .unwrap_or_else(|| panic!("capability {c} is not justified in JUSTIFIED_CAPS"))
                .1;
            1u64 << bit
        })
        .fold(0, |a, b| a | b)
}

/// Runs the ignored child below under `setpriv` with exactly the capabilities the DaemonSet adds
/// (every other one gone from the bounding set, no_new_privs as allowPrivilegeEscalation: false),
/// so the verifier and map updates see what they see in the pod.
#[test]
fn datapath_loads_and_drops_with_only_the_daemonset_capabilities() {
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "run as root (sudo cargo xtask test): this test loads BPF programs"
    );
    let docs = rendered("base");
    let sc = &agent_container(daemonset(&docs))["securityContext"];
    let caps = strs(&sc["capabilities"]["add"]);
    let list = caps
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    let set = format!("-all,{list}");
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=0", "--regid=0", "--clear-groups", "--no-new-privs"])
        .arg(format!("--bounding-set={set}"))
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"))
        .arg("--")
        .arg(exe)
        .args([
            "capability_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{:x}", cap_mask(&caps)))
        .output()
        .expect("run setpriv (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "with only {caps:?}:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("1 passed"),
        "the child did not run:\n{stdout}"
    );
}

fn status_caps(field: &str) -> u64 {
    let status = read(Path::new("/proc/self/status"));
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

#[test]
#[ignore = "run by datapath_loads_and_drops_with_only_the_daemonset_capabilities, under setpriv"]
fn capability_child() {
    use wsguard_common::maps::BanValue;
    use wsguard_tests::{
        dataplane::{DataPlane, XDP_DROP, XDP_PASS, boot_ns},
        packet::Pkt,
    };
    let want = u64::from_str_radix(
        &std::env::var(CHILD_ENV).expect("started by the parent"),
        16,
    )
    .unwrap();
    for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(
            status_caps(field),
            want,
            "{field} is exactly the DaemonSet's set"
        );
    }
    let mut dp = DataPlane::load(&[80]).expect("the verifier accepts the programs");
    dp.ban(
        "198.18.0.66",
        32,
        BanValue {
            created_ns: boot_ns(),
            ..Default::default()
        },
    )
    .expect("write the ban map");
    let banned = Pkt::tcp("198.18.0.66", 40000, "198.18.1.1", 80)
        .syn()
        .build();
    let clean = Pkt::tcp("198.18.0.10", 40000, "198.18.1.1", 80)
        .syn()
        .build();
    assert_eq!(dp.xdp(&banned).unwrap(), XDP_DROP);
    assert_eq!(dp.xdp(&clean).unwrap(), XDP_PASS);
}
