//! Reading deploy/: the repository's files, YAML documents, and the kustomizations rendered by
//! `kubectl kustomize`, the same renderer `kubectl apply -k` (deploy/README.md) uses.

use serde::Deserialize as _;
use serde_json::Value;
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

/// The kustomizations an operator applies; every directory under overlays/ must be listed.
pub const VARIANTS: &[&str] = &[
    "base",
    "overlays/cloud-lb",
    "overlays/crowdsec",
    "overlays/log-detection",
];
pub const METRICS_PORT: u64 = 9477;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn kube_dir() -> PathBuf {
    root().join("deploy/kubernetes")
}

pub fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// PRODUCT.md's Agent and Metrics sections: from the contract beside the repository when it is
/// there (a developer's checkout), else from the excerpt committed with the tests (CI's clone).
pub fn product() -> String {
    let shared = root().join("../shared/PRODUCT.md");
    match fs::read_to_string(&shared) {
        Ok(text) => text,
        Err(_) => read(&excerpt_path()),
    }
}

pub fn excerpt_path() -> PathBuf {
    root().join("tests/tests/deploy/product_excerpt.md")
}

/// The committed excerpt must say what the contract says, section for section.
#[test]
fn excerpt_matches_the_contract() {
    let shared = root().join("../shared/PRODUCT.md");
    let Ok(contract) = fs::read_to_string(&shared) else {
        // Nothing to compare with; the excerpt itself is what the other tests read.
        assert!(read(&excerpt_path()).contains("## Metrics"));
        return;
    };
    let excerpt = read(&excerpt_path());
    for heading in ["## Agent", "## Metrics"] {
        let section = |t: &str| {
            let s = t.split(heading).nth(1).expect(heading).to_owned();
            s.split("\n## ").next().unwrap().trim().to_owned()
        };
        assert_eq!(
            section(&excerpt),
            section(&contract),
            "{heading} in {} differs from {}: copy it again",
            excerpt_path().display(),
            shared.display()
        );
    }
}

pub fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{what}: invalid YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

pub fn yaml_file(p: &Path) -> Vec<Value> {
    yaml_docs(&read(p), &p.display().to_string())
}

pub fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a list of strings"))
                .collect()
        })
        .unwrap_or_default()
}

/// `kubectl kustomize deploy/kubernetes/VARIANT`, rendered once per test process. A missing
/// kubectl fails every test that reads a rendering, saying so: a test of a renderer of our own
/// would only prove that renderer agrees with the manifests.
pub fn rendered(variant: &str) -> Vec<Value> {
    static ALL: OnceLock<BTreeMap<&'static str, Vec<Value>>> = OnceLock::new();
    ALL.get_or_init(|| VARIANTS.iter().map(|v| (*v, kustomize(v))).collect())
        .get(variant)
        .unwrap_or_else(|| panic!("{variant} is not in VARIANTS"))
        .clone()
}

fn kustomize(variant: &str) -> Vec<Value> {
    let dir = kube_dir().join(variant);
    let out = match Command::new("kubectl").arg("kustomize").arg(&dir).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "\n\n!!! kubectl is MISSING ({e}): deploy/ could NOT be rendered, so nothing in it \
             was checked.\n!!! The machine image ships it (/usr/bin/kubectl, with kustomize \
             built in); elsewhere install kubectl >= 1.27 from the Kubernetes package \
             repositories.\n\n"
        ),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {variant}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = yaml_docs(&String::from_utf8_lossy(&out.stdout), variant);
    assert!(
        !docs.is_empty(),
        "kubectl kustomize {variant}: no documents"
    );
    docs
}

pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in the rendering"))
}

pub fn daemonset(docs: &[Value]) -> &Value {
    find(docs, "DaemonSet", "wsguard")
}

pub fn agent_container(ds: &Value) -> &Value {
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

/// The capabilities the agent container adds, as the manifest spells them (`BPF`).
pub fn added_caps(docs: &[Value]) -> Vec<String> {
    strs(&agent_container(daemonset(docs))["securityContext"]["capabilities"]["add"])
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// The agent config file inside the ConfigMap.
pub fn config_text(docs: &[Value]) -> String {
    find(docs, "ConfigMap", "wsguard-config")["data"]["wsguard.toml"]
        .as_str()
        .expect("data.wsguard.toml")
        .to_owned()
}
