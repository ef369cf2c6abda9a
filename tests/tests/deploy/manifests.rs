//! Every manifest parses, is applied by some kustomization, and every rendering validates
//! against the Kubernetes OpenAPI schemas; the Service and ServiceMonitor reach the agent.

use serde_json::Value;
use std::{collections::BTreeSet, fs, path::PathBuf, process::Command};

use crate::kube::{
    METRICS_PORT, VARIANTS, agent_container, daemonset, find, kube_dir, rendered, strs, yaml_file,
};

/// An old and the newest Kubernetes release whose schemas kubernetes-validate bundles.
const KUBERNETES_VERSIONS: &[&str] = &["1.33.0", "1.35.0", "1.37.0"];

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
    assert!(files.len() >= 10, "{files:?}");
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
    // Each variant renders (kubectl kustomize) to the same set of objects.
    let kinds = |v: &str| -> BTreeSet<(String, String)> {
        rendered(v)
            .iter()
            .map(|d| (d["kind"].to_string(), d["metadata"]["name"].to_string()))
            .collect()
    };
    for v in VARIANTS {
        let mut want = kinds("base");
        if *v == "overlays/crowdsec" {
            // The nodes' LAPI credentials (deploy/README.md, "Cluster-wide bans").
            want.insert(("\"Secret\"".into(), "\"wsguard-crowdsec\"".into()));
        }
        assert_eq!(kinds(v), want, "{v} adds or loses objects");
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

/// The validator is a real one: a DaemonSet with a misspelt field fails it.
#[test]
fn schema_validation_rejects_a_broken_daemonset() {
    let mut ds = daemonset(&rendered("base")).clone();
    ds["spec"]["template"]["spec"]["hostNetwrok"] = Value::from(true);
    let file = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("deploy-broken-ds.yaml");
    fs::write(&file, serde_norway::to_string(&ds).unwrap()).unwrap();
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "-k", "1.37.0"])
        .arg(&file)
        .output()
        .expect(
            "run kubernetes-validate (see rendered_manifests_validate_against_kubernetes_schemas)",
        );
    assert!(
        !out.status.success(),
        "a misspelt field passed validation:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hostNetwrok"),
        "the error names the bad field:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
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
