//! Every log-line parser on arbitrary bytes: no panic, and the invariants the detector relies
//! on (a skipped line has no hits, hits name real rules, the ingress format is an extension of
//! `combined`, syslog framing only ever removes a prefix).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use wsguard_logs_fuzz::parse::{
    Format, JsonFields, LineClassifier, Matcher, PatternMatch, StatusMatch, access, syslog,
};

fn classifiers() -> &'static [LineClassifier] {
    static C: OnceLock<Vec<LineClassifier>> = OnceLock::new();
    C.get_or_init(|| {
        let status = || {
            Matcher::Status(StatusMatch {
                statuses: vec![(400, 400), (403, 403), (426, 426), (500, 599)],
                path_prefixes: vec!["/ws".into()],
            })
        };
        let any_path = || {
            Matcher::Status(StatusMatch {
                statuses: vec![(400, 499)],
                path_prefixes: vec![],
            })
        };
        let pattern = || {
            Matcher::Pattern(
                PatternMatch::new(
                    r"invalid Upgrade header: (?P<forwarded>\S*) .*client=(?P<client>\S+)",
                )
                .unwrap(),
            )
        };
        let trusted = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        [
            Format::Combined,
            Format::IngressNginx,
            Format::Json(JsonFields::default()),
            Format::Text,
        ]
        .into_iter()
        .map(|format| LineClassifier {
            format,
            matchers: vec![status(), any_path(), pattern()],
            trusted: trusted.clone(),
        })
        .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    let mut hits = Vec::new();
    for c in classifiers() {
        match c.classify(&line, &mut hits) {
            Ok(v) => {
                assert!(hits.iter().all(|(i, _)| *i < c.matchers.len()));
                if let Some(s) = v.status {
                    assert!((100..=599).contains(&s));
                }
                assert!(v.upstream.is_none() || v.is_server_error());
            }
            Err(_) => assert!(hits.is_empty()),
        }
    }
    if let Ok(ing) = access::parse_ingress(&line) {
        let comb = access::parse_combined(&line).expect("ingress lines extend combined");
        assert_eq!(
            (ing.peer, ing.request, ing.status),
            (comb.peer, comb.request, comb.status)
        );
    }
    if let Ok(msg) = syslog::message(&line) {
        assert!(line.contains(msg));
    }
});
