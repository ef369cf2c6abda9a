//! `wsguard_proxy_headers_total{version,result}` (issue 12): flows whose first payload was read
//! as a PROXY protocol header. Flows cut at their header count in
//! `wsguard_packets_total{action="reset"}`, with the other packet actions.

use std::fmt;

use prometheus_client::{encoding::DescriptorEncoder, metrics::MetricType};

use super::value;
use crate::api::ProxyHeadersJson;

pub(super) fn encode(h: &ProxyHeadersJson, enc: &mut DescriptorEncoder) -> Result<(), fmt::Error> {
    let mut me = enc.encode_descriptor(
        "wsguard_proxy_headers",
        "Flows that began with a PROXY protocol header, by version and result (client: judged by \
         the client it names; local: the load balancer's own, never counted; malformed, missing: \
         from a trusted sender, charged to nobody; untrusted: from a sender outside \
         proxy_protocol_from, not believed).",
        None,
        MetricType::Counter,
    )?;
    for (version, r) in h.versions() {
        for (result, n) in r.items() {
            let labels: [(&str, &str); 2] = [("version", version), ("result", result)];
            value(&labels, MetricType::Counter, n, &mut me)?;
        }
    }
    Ok(())
}
