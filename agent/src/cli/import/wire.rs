//! A batch as `POST /v1/import` takes it: runs of entries with the same terms become one
//! [`ImportGroup`](crate::api::ImportGroup), so a blocklist with one TTL and reason is sent as
//! a list of addresses, each written straight from its [`Cidr`] into the body.

use serde::{Serialize, Serializer};
use time::OffsetDateTime;

use super::formats::{Outcome, Parsed};
use crate::addr::Cidr;

/// The wire form of [`ImportGroup`](crate::api::ImportGroup), borrowing.
#[derive(Serialize)]
struct Group<'a> {
    ttl_s: Option<u64>,
    permanent: bool,
    reason: Option<&'a str>,
    observe: bool,
    hard: bool,
    #[serde(serialize_with = "as_text")]
    addrs: Vec<Cidr>,
}

#[derive(Serialize)]
struct Body<'a> {
    groups: Vec<Group<'a>>,
}

fn as_text<S: Serializer>(addrs: &[Cidr], s: S) -> Result<S::Ok, S::Error> {
    struct Text<'a>(&'a Cidr);
    impl Serialize for Text<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(self.0)
        }
    }
    s.collect_seq(addrs.iter().map(Text))
}

/// The request body for `batch`, with TTLs of absolute expiries counted from `now`. Only
/// consecutive entries are grouped, so the agent applies them in file order (an address listed
/// twice ends as its last line says).
pub fn body(o: &Outcome, batch: &[Parsed], now: OffsetDateTime) -> serde_json::Result<Vec<u8>> {
    let mut groups: Vec<Group<'_>> = Vec::new();
    let mut key = None;
    for p in batch {
        let (t, ttl_s) = o.terms_at(p, now);
        let k = (p.terms, ttl_s);
        match groups.last_mut() {
            Some(g) if key == Some(k) => g.addrs.push(p.cidr),
            _ => {
                key = Some(k);
                groups.push(Group {
                    ttl_s,
                    permanent: t.permanent,
                    reason: t.reason.as_deref(),
                    observe: t.observe,
                    hard: t.hard,
                    addrs: vec![p.cidr],
                });
            }
        }
    }
    serde_json::to_vec(&Body { groups })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{ImportGroup, ImportRequest},
        cli::import::formats::{self, Defaults, Format},
    };

    #[test]
    fn runs_of_the_same_terms_become_one_group_in_file_order() {
        let text = "198.51.100.1,1h,a\n198.51.100.2,1h,a\n2001:db8::/64,permanent,b\n\
                    198.51.100.1,1h,a\n";
        let o = formats::parse(text, Format::Csv, &Defaults::default()).unwrap();
        let now = OffsetDateTime::now_utc();
        let req: ImportRequest =
            serde_json::from_slice(&body(&o, &o.entries, now).unwrap()).unwrap();
        let g = |ttl_s, permanent, reason: &str, addrs: &[&str]| ImportGroup {
            ttl_s,
            permanent,
            reason: Some(reason.into()),
            observe: false,
            hard: false,
            addrs: addrs.iter().map(|a| a.to_string()).collect(),
        };
        assert!(req.entries.is_empty());
        assert_eq!(
            req.groups,
            [
                g(Some(3600), false, "a", &["198.51.100.1", "198.51.100.2"]),
                g(None, true, "b", &["2001:db8::/64"]),
                g(Some(3600), false, "a", &["198.51.100.1"]),
            ]
        );
        assert_eq!(req.len(), 4);
    }
}
