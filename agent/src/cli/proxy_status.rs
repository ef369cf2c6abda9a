//! `wsguard status`'s PROXY protocol lines (issue 12): the trusted senders, and a warning per
//! untrusted sender, naming it and the setting that would trust it.

use std::time::Duration;

use crate::{api::ProxyStatusJson, duration};

/// The `proxy` line of the header block, when senders are trusted.
pub fn trusted_line(p: &ProxyStatusJson) -> Option<String> {
    (!p.from.is_empty()).then(|| {
        format!(
            "proxy     {} (trusted PROXY protocol senders)",
            p.from.join(", ")
        )
    })
}

pub fn warnings(p: &ProxyStatusJson) -> Vec<String> {
    p.untrusted_senders
        .iter()
        .map(|s| {
            let seen = format!(
                "PROXY protocol {} headers from {} ({} flows, last {} ago)",
                s.version,
                s.addr,
                s.flows,
                duration::human(Duration::from_secs(s.last_seen_s))
            );
            if p.from.is_empty() {
                format!(
                    "{seen}, but proxy_protocol_from is empty: those flows are not judged and \
                     their clients never banned; if {addr} is your load balancer, trust it with \
                     --proxy-protocol-from {addr} (proxy_protocol_from in the config)",
                    addr = s.addr
                )
            } else {
                format!(
                    "{seen}, which is not in proxy_protocol_from: its headers are not believed \
                     and it is judged as the client itself; if it is one of your load \
                     balancers, add {} to proxy_protocol_from",
                    s.addr
                )
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ProxySenderJson;

    #[test]
    fn warnings_name_the_sender_and_the_setting() {
        let sender = ProxySenderJson {
            addr: "198.18.0.10".into(),
            version: "v2".into(),
            flows: 12,
            last_seen_s: 3,
        };
        let mut p = ProxyStatusJson {
            from: Vec::new(),
            untrusted_senders: vec![sender],
        };
        assert_eq!(trusted_line(&p), None);
        let w = warnings(&p);
        assert!(
            w[0].contains("v2 headers from 198.18.0.10 (12 flows, last 3s ago)")
                && w[0].contains("--proxy-protocol-from 198.18.0.10"),
            "{w:?}"
        );
        p.from = vec!["198.18.0.5/32".into()];
        let w = warnings(&p);
        assert!(
            w[0].contains("not in proxy_protocol_from") && w[0].contains("judged as the client"),
            "{w:?}"
        );
        assert!(trusted_line(&p).unwrap().contains("198.18.0.5/32"));
        p.untrusted_senders.clear();
        assert!(warnings(&p).is_empty());
    }
}
