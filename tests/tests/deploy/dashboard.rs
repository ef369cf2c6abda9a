//! The Grafana dashboard uses only the metrics PRODUCT.md names, and deploy/README.md gives the
//! operator the commands in a safe order.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

use crate::kube::{product, read, root};

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
        // `label="a|b",other="c|d"`
        for pair in rest.trim_end_matches('}').split("\",") {
            let Some((label, values)) = pair.split_once('=') else {
                continue;
            };
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
        "PROXY headers",
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
