//! Prometheus text endpoint `/metrics`, plus `/healthz` and `/readyz`.
//!
//! A scrape reads one `Backend::metrics()` snapshot, whose counts the agent keeps as it goes:
//! scraping never walks the ban map, so a 1M-entry map costs the same as an empty one.

use std::{fmt, net::SocketAddr, sync::Arc};

use anyhow::Context;
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{
    api::{Backend, MetricsSnapshot},
    daemon::LogsView,
};

mod logs;
mod proxy;

/// Log detection's counters, read at each scrape; `None` from the probe: no `[logs]`.
pub type LogsProbe = Arc<dyn Fn() -> Option<LogsView> + Send + Sync>;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serve metrics until an error; the daemon drops the future to stop it.
pub async fn serve_metrics(
    addr: SocketAddr,
    backend: Arc<dyn Backend>,
    logs: Option<LogsProbe>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    axum::serve(listener, router_with(backend, logs))
        .await
        .with_context(|| format!("metrics endpoint on {addr}"))
}

pub fn router(backend: Arc<dyn Backend>) -> Router {
    router_with(backend, None)
}

/// `router`, plus the log detection metrics when `logs` is given.
pub fn router_with(backend: Arc<dyn Backend>, logs: Option<LogsProbe>) -> Router {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(backend.clone())));
    if let Some(probe) = logs {
        registry.register_collector(Box::new(logs::LogsCollector(probe)));
    }
    let state = Arc::new((registry, backend));
    Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(state)
}

type Shared = State<Arc<(Registry, Arc<dyn Backend>)>>;

async fn scrape(State(s): Shared) -> impl IntoResponse {
    let out = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        encode(&mut text, &s.0).map(|()| text)
    })
    .await;
    match out {
        Ok(Ok(text)) => {
            (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
        }
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot read the agent's counters\n",
        )
            .into_response(),
    }
}

async fn ready(State(s): Shared) -> impl IntoResponse {
    if s.1.ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

struct SnapshotCollector(Arc<dyn Backend>);

impl fmt::Debug for SnapshotCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SnapshotCollector")
    }
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        // A failed snapshot fails the scrape: Prometheus marks the target down instead of
        // recording zeros that look like resets.
        let snap = self.0.metrics().map_err(|_| fmt::Error)?;
        encode_snapshot(&snap, &mut enc)
    }
}

/// Counters are named without `_total`: the encoder appends it.
fn encode_snapshot(m: &MetricsSnapshot, enc: &mut DescriptorEncoder) -> Result<(), fmt::Error> {
    let s = &m.stats;
    let p = &s.packets;
    family(
        enc,
        "wsguard_packets",
        "Packets seen by the XDP program, by action.",
        MetricType::Counter,
        "action",
        &p.items(),
    )?;
    let h = &s.handshakes;
    family(
        enc,
        "wsguard_handshakes",
        "First requests of flows on watched ports, by verdict.",
        MetricType::Counter,
        "verdict",
        // The metric's label is singular where the JSON field is plural.
        &h.items().map(|(k, v)| {
            (
                if k == "upstream_errors" {
                    "upstream_error"
                } else {
                    k
                },
                v,
            )
        }),
    )?;
    let r = &s.bad_reasons;
    family(
        enc,
        "wsguard_bad_handshakes",
        "Bad WebSocket handshakes, by reason.",
        MetricType::Counter,
        "reason",
        &r.items(),
    )?;
    proxy::encode(&s.proxy_headers, enc)?;
    let by_source = |v: &[(crate::model::BanSource, u64)]| -> Vec<(&'static str, u64)> {
        v.iter().map(|(s, n)| (s.as_str(), *n)).collect()
    };
    family(
        enc,
        "wsguard_bans_active",
        "Bans in force, by source.",
        MetricType::Gauge,
        "source",
        &by_source(&m.bans_active),
    )?;
    family(
        enc,
        "wsguard_bans_created",
        "Bans created since the agent started, by source.",
        MetricType::Counter,
        "source",
        &by_source(&m.bans_created),
    )?;
    let refused: Vec<(&str, u64)> = m
        .bans_refused
        .iter()
        .map(|(r, n)| (r.as_str(), *n))
        .collect();
    family(
        enc,
        "wsguard_bans_refused",
        "Ban requests refused by a safety rail, by reason.",
        MetricType::Counter,
        "reason",
        &refused,
    )?;
    single(
        enc,
        "wsguard_ban_map_entries",
        "Entries in the kernel ban maps.",
        MetricType::Gauge,
        m.ban_map_entries,
    )?;
    single(
        enc,
        "wsguard_ban_map_capacity",
        "Capacity of the kernel ban maps.",
        MetricType::Gauge,
        m.ban_map_capacity,
    )?;
    single(
        enc,
        "wsguard_events_lost",
        "Burst events the ring buffer could not deliver.",
        MetricType::Counter,
        s.events_lost,
    )?;
    single(
        enc,
        "wsguard_xdp_netlink_fallback",
        "Interfaces whose XDP runs through a netlink attachment (no pinnable link; restarts adopt or swap it through netlink).",
        MetricType::Gauge,
        m.netlink_fallbacks,
    )?;
    single(
        enc,
        "wsguard_circuit_breaker_open",
        "1 while the ban-rate circuit breaker holds automatic bans in observe mode.",
        MetricType::Gauge,
        u64::from(m.breaker_open),
    )?;
    if let Some(c) = &m.crowdsec {
        encode_crowdsec(c, enc)?;
    }
    family(
        enc,
        "wsguard_build_info",
        "The running build.",
        MetricType::Gauge,
        "version",
        &[(env!("CARGO_PKG_VERSION"), 1)],
    )
}

/// `[crowdsec]` (issue 13). Beyond PRODUCT.md's three: why decisions were refused or ignored,
/// pulls by result, the last pull's duration, the push queue.
fn encode_crowdsec(
    c: &crate::crowdsec::CrowdsecMetrics,
    enc: &mut DescriptorEncoder,
) -> Result<(), fmt::Error> {
    let pairs = |v: &[(String, u64)]| -> Vec<(String, u64)> { v.to_vec() };
    let fam = |enc: &mut DescriptorEncoder,
               name: &str,
               help: &str,
               label: &'static str,
               v: &[(String, u64)]|
     -> Result<(), fmt::Error> {
        let v: Vec<(&str, u64)> = v.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        family(enc, name, help, MetricType::Counter, label, &v)
    };
    single(
        enc,
        "wsguard_crowdsec_up",
        "1 while the last pull from CrowdSec LAPI succeeded.",
        MetricType::Gauge,
        u64::from(c.up),
    )?;
    fam(
        enc,
        "wsguard_crowdsec_decisions",
        "LAPI decisions by what happened to them on this node.",
        "action",
        &pairs(&c.decisions),
    )?;
    fam(
        enc,
        "wsguard_crowdsec_decisions_refused",
        "LAPI decisions refused on this node, by reason (the allowlist wins; the ban map is full).",
        "reason",
        &c.refused,
    )?;
    fam(
        enc,
        "wsguard_crowdsec_decisions_ignored",
        "LAPI decisions wsguard cannot enforce, by reason.",
        "reason",
        &c.ignored,
    )?;
    fam(
        enc,
        "wsguard_crowdsec_pulls",
        "Pulls from LAPI's decision stream, by result.",
        "result",
        &c.pulls,
    )?;
    fam(
        enc,
        "wsguard_crowdsec_pushes",
        "Bans published to LAPI (ok), failed attempts (retried), dropped from a full queue.",
        "result",
        &c.pushes,
    )?;
    let me = enc.encode_descriptor(
        "wsguard_crowdsec_pull_duration_seconds",
        "How long the last pull from LAPI took, answer applied.",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(c.last_pull_ms as f64 / 1000.0).encode(me)?;
    single(
        enc,
        "wsguard_crowdsec_push_queue",
        "Bans and deletions waiting to be sent to LAPI.",
        MetricType::Gauge,
        c.push_queue,
    )
}

fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    label: &'static str,
    values: &[(&str, u64)],
) -> Result<(), fmt::Error> {
    let mut me = enc.encode_descriptor(name, help, None, ty)?;
    for (v, n) in values {
        let labels: [(&str, &str); 1] = [(label, v)];
        value(&labels, ty, *n, &mut me)?;
    }
    Ok(())
}

fn value(
    labels: &impl EncodeLabelSet,
    ty: MetricType,
    n: u64,
    me: &mut prometheus_client::encoding::MetricEncoder,
) -> Result<(), fmt::Error> {
    let fam = me.encode_family(labels)?;
    match ty {
        MetricType::Counter => ConstCounter::new(n).encode(fam),
        _ => ConstGauge::new(n as i64).encode(fam),
    }
}

fn single(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    n: u64,
) -> Result<(), fmt::Error> {
    let me = enc.encode_descriptor(name, help, None, ty)?;
    match ty {
        MetricType::Counter => ConstCounter::new(n).encode(me),
        _ => ConstGauge::new(n as i64).encode(me),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BanSource;

    #[test]
    fn every_product_metric_is_exposed() {
        let mut snap = MetricsSnapshot::default();
        snap.stats.packets.dropped = 7;
        snap.stats.handshakes.upstream_errors = 3;
        snap.stats.packets.reset = 4;
        snap.stats.proxy_headers.v2.local = 9;
        snap.bans_active = BanSource::ALL.iter().map(|s| (*s, 1)).collect();
        snap.bans_created = vec![(BanSource::Kernel, 5)];
        snap.bans_refused = vec![
            ("allowlisted".into(), 2),
            ("full".into(), 0),
            ("rate_limited".into(), 1),
        ];
        snap.breaker_open = true;
        snap.crowdsec = Some(crate::crowdsec::Counters::default().metrics(4));
        let mut enc_text = String::new();
        let mut reg = Registry::default();
        reg.register_collector(Box::new(Fixed(snap)));
        encode(&mut enc_text, &reg).unwrap();
        for line in [
            "wsguard_packets_total{action=\"dropped\"} 7",
            "wsguard_handshakes_total{verdict=\"upstream_error\"} 3",
            "wsguard_bad_handshakes_total{reason=\"no_upgrade\"} 0",
            "wsguard_bans_active{source=\"import\"} 1",
            "wsguard_bans_created_total{source=\"kernel\"} 5",
            "wsguard_bans_refused_total{reason=\"rate_limited\"} 1",
            "wsguard_ban_map_entries 0",
            "wsguard_ban_map_capacity 0",
            "wsguard_events_lost_total 0",
            "wsguard_xdp_netlink_fallback 0",
            "wsguard_circuit_breaker_open 1",
            "wsguard_crowdsec_up 0",
            "wsguard_crowdsec_decisions_total{action=\"refused\"} 0",
            "wsguard_crowdsec_decisions_ignored_total{reason=\"duration\"} 0",
            "wsguard_crowdsec_decisions_refused_total{reason=\"allowlisted\"} 0",
            "wsguard_crowdsec_pulls_total{result=\"too_large\"} 0",
            "wsguard_crowdsec_pushes_total{result=\"dropped\"} 0",
            "wsguard_crowdsec_pull_duration_seconds 0",
            "wsguard_crowdsec_push_queue 4",
            "wsguard_build_info{version=\"",
            "wsguard_packets_total{action=\"reset\"} 4",
            "wsguard_proxy_headers_total{version=\"v1\",result=\"client\"} 0",
            "wsguard_proxy_headers_total{version=\"v2\",result=\"local\"} 9",
            "wsguard_proxy_headers_total{version=\"v2\",result=\"untrusted\"} 0",
        ] {
            assert!(enc_text.contains(line), "missing {line} in\n{enc_text}");
        }
    }

    #[derive(Debug)]
    struct Fixed(MetricsSnapshot);

    impl Collector for Fixed {
        fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
            encode_snapshot(&self.0, &mut enc)
        }
    }
}
