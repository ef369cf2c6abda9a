//! LAPI's JSON (crowdsec 1.4 `pkg/models`), read strictly: a body that is not a stream answer
//! is refused whole; inside a good answer each decision is judged on its own, and one that
//! wsguard cannot enforce is skipped with a reason, never guessed at.

use serde::{Deserialize, Serialize};

use super::godur;
use crate::addr::Cidr;

/// `GET /v1/decisions/stream`: 1.4 sends `null` for an empty list.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamAnswer {
    #[serde(default)]
    pub new: Option<Vec<Item>>,
    #[serde(default)]
    pub deleted: Option<Vec<Item>>,
}

impl StreamAnswer {
    /// Only a JSON object is an answer (serde would also take a struct from an array).
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err("not a JSON object".into());
        }
        serde_json::from_slice(body).map_err(|e| e.to_string())
    }
}

/// One element of `new` or `deleted`: a decision with the fields and types LAPI defines, or
/// anything else (kept only to be counted).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Item {
    Decision(RawDecision),
    Malformed(serde::de::IgnoredAny),
}

/// The fields a bouncer gets (`until`, `simulated`, `uuid` may be there too; not used).
#[derive(Debug, Clone, Deserialize)]
pub struct RawDecision {
    pub id: i64,
    pub origin: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub scope: String,
    pub value: String,
    pub duration: String,
    pub scenario: String,
}

/// Why a decision changes nothing on this node: the `reason` label of
/// `wsguard_crowdsec_decisions_ignored_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ignored {
    /// Not a JSON object with LAPI's fields and types.
    Malformed,
    /// `captcha`, `throttle`, ...: XDP can only drop.
    Type,
    /// `Country`, `AS`, `Username`, ...
    Scope,
    /// Not an address (scope `Ip`) or a CIDR (scope `Range`).
    Value,
    /// Not a Go duration.
    Duration,
    /// A `new` decision whose duration is already over.
    Expired,
    /// Lifted on this node with `wsguard ban rm` (`--local`, or before LAPI took the delete).
    RemovedLocally,
}

impl Ignored {
    pub const ALL: [Ignored; 7] = [
        Self::Malformed,
        Self::Type,
        Self::Scope,
        Self::Value,
        Self::Duration,
        Self::Expired,
        Self::RemovedLocally,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Type => "type",
            Self::Scope => "scope",
            Self::Value => "value",
            Self::Duration => "duration",
            Self::Expired => "expired",
            Self::RemovedLocally => "removed_locally",
        }
    }

    pub fn index(self) -> usize {
        Self::ALL.iter().position(|x| *x == self).expect("in ALL")
    }
}

/// A decision wsguard can enforce: a ban of an address or a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: i64,
    pub cidr: Cidr,
    /// Signed nanoseconds from the moment the answer was read.
    pub remaining_ns: i64,
    pub origin: String,
    pub scenario: String,
}

impl RawDecision {
    /// Judge one decision. `Expired` is left to the caller: a `deleted` decision has a negative
    /// duration and is still meaningful.
    pub fn check(&self) -> Result<Decision, Ignored> {
        if !self.kind.eq_ignore_ascii_case("ban") {
            return Err(Ignored::Type);
        }
        // 1.4 stores the scope as the writer sent it; CAPI's is sometimes lower case.
        let cidr = if self.scope.eq_ignore_ascii_case("ip") {
            parse_ip(&self.value)?
        } else if self.scope.eq_ignore_ascii_case("range") {
            parse_range(&self.value)?
        } else {
            return Err(Ignored::Scope);
        };
        let remaining_ns = godur::parse(&self.duration).map_err(|_| Ignored::Duration)?;
        Ok(Decision {
            id: self.id,
            cidr,
            remaining_ns,
            origin: self.origin.clone(),
            scenario: self.scenario.clone(),
        })
    }
}

/// An address, or a full-length prefix of one (`1.2.3.4/32`, as old CAPI lists send).
fn parse_ip(v: &str) -> Result<Cidr, Ignored> {
    if v.trim() != v {
        return Err(Ignored::Value);
    }
    let c: Cidr = v.parse().map_err(|_| Ignored::Value)?;
    if c.is_host() {
        Ok(c)
    } else {
        Err(Ignored::Value)
    }
}

/// A CIDR; like LAPI (Go's `net.ParseCIDR`), host bits are masked off.
fn parse_range(v: &str) -> Result<Cidr, Ignored> {
    if v.trim() != v {
        return Err(Ignored::Value);
    }
    let (a, p) = v.split_once('/').ok_or(Ignored::Value)?;
    let ip: std::net::IpAddr = a.parse().map_err(|_| Ignored::Value)?;
    let prefix: u8 = p.parse().map_err(|_| Ignored::Value)?;
    if p.starts_with('+') || p.len() > 3 {
        return Err(Ignored::Value);
    }
    let net = ipnet::IpNet::new(ip, prefix).map_err(|_| Ignored::Value)?;
    Cidr::new(net.network(), prefix).map_err(|_| Ignored::Value)
}

/// `POST /v1/watchers/login`.
#[derive(Debug, Serialize)]
pub struct Login<'a> {
    pub machine_id: &'a str,
    pub password: &'a str,
    pub scenarios: &'a [&'a str],
}

#[derive(Debug, Deserialize)]
pub struct LoginAnswer {
    pub token: String,
    /// RFC 3339.
    pub expire: String,
}

/// `POST /v1/alerts` body element (crowdsec 1.4 `models.Alert`, required fields only plus
/// decisions and meta).
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub scenario: String,
    pub scenario_hash: String,
    pub scenario_version: String,
    pub message: String,
    pub events_count: i32,
    pub start_at: String,
    pub stop_at: String,
    pub capacity: i32,
    pub leakspeed: String,
    pub simulated: bool,
    pub remediation: bool,
    pub events: Vec<serde_json::Value>,
    pub source: Source,
    pub decisions: Vec<AlertDecision>,
    pub meta: Vec<Meta>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Source {
    pub scope: String,
    pub value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AlertDecision {
    pub origin: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub scope: String,
    pub value: String,
    pub duration: String,
    pub scenario: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    pub key: String,
    pub value: String,
}

/// `DELETE /v1/decisions…`: `{"nbDeleted":"N"}`.
#[derive(Debug, Deserialize)]
pub struct DeleteAnswer {
    #[serde(rename = "nbDeleted")]
    pub nb_deleted: String,
}

/// LAPI's scope and value text of a ban (`Ip` + bare address for hosts).
pub fn scope_value(c: &Cidr) -> (&'static str, String) {
    if c.is_host() {
        ("Ip", c.addr().to_string())
    } else {
        ("Range", c.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: &str, scope: &str, value: &str, duration: &str) -> RawDecision {
        RawDecision {
            id: 1,
            origin: "cscli".into(),
            kind: kind.into(),
            scope: scope.into(),
            value: value.into(),
            duration: duration.into(),
            scenario: "manual".into(),
        }
    }

    #[test]
    fn null_lists_and_strict_types() {
        let a: StreamAnswer = serde_json::from_str(r#"{"deleted":null,"new":null}"#).unwrap();
        assert!(a.new.is_none() && a.deleted.is_none());
        let a: StreamAnswer = serde_json::from_str(
            r#"{"new":[{"id":"7","origin":"x","type":"ban","scope":"Ip","value":"1.2.3.4","duration":"1h","scenario":"s"},
                       {"id":8,"origin":"x","type":"ban","scope":"Ip","value":"1.2.3.4","duration":"1h","scenario":"s","uuid":"u"},
                       42, null],"deleted":[]}"#,
        )
        .unwrap();
        let items = a.new.unwrap();
        assert!(matches!(items[0], Item::Malformed(_)), "string id");
        assert!(matches!(&items[1], Item::Decision(d) if d.id == 8));
        assert!(matches!(items[2], Item::Malformed(_)));
        assert!(matches!(items[3], Item::Malformed(_)));
        for bad in [
            r#"[]"#,
            r#"{"new":{}}"#,
            r#"{"new":[],"extra":1}"#,
            r#"{"new":"x"}"#,
            "garbage",
            "",
        ] {
            assert!(StreamAnswer::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn scopes_values_and_types() {
        let d = raw("ban", "Ip", "::ffff:198.18.1.2", "1h").check().unwrap();
        assert_eq!(d.cidr.to_string(), "198.18.1.2");
        let d = raw("ban", "ip", "198.18.1.2/32", "1h").check().unwrap();
        assert_eq!(d.cidr.to_string(), "198.18.1.2");
        let d = raw("ban", "Range", "198.18.1.7/24", "1h").check().unwrap();
        assert_eq!(d.cidr.to_string(), "198.18.1.0/24");
        let d = raw("ban", "Range", "fd00::1/64", "1h").check().unwrap();
        assert_eq!(d.cidr.to_string(), "fd00::/64");
        let d = raw("ban", "Range", "::ffff:198.18.0.0/112", "1h")
            .check()
            .unwrap();
        assert_eq!(d.cidr.to_string(), "198.18.0.0/16");
        let d = raw("Ban", "Ip", "fd00::7", "-5s").check().unwrap();
        assert_eq!(d.remaining_ns, -5_000_000_000);
        for (r, why) in [
            (raw("captcha", "Ip", "1.2.3.4", "1h"), Ignored::Type),
            (raw("ban", "Country", "FR", "1h"), Ignored::Scope),
            (raw("ban", "AS", "1234", "1h"), Ignored::Scope),
            (raw("ban", "Ip", "1.2.3.4/24", "1h"), Ignored::Value),
            (raw("ban", "Ip", "not-an-ip", "1h"), Ignored::Value),
            (raw("ban", "Ip", " 1.2.3.4", "1h"), Ignored::Value),
            (raw("ban", "Range", "1.2.3.4", "1h"), Ignored::Value),
            (raw("ban", "Range", "1.2.3.0/33", "1h"), Ignored::Value),
            (raw("ban", "Range", "1.2.3.0/+8", "1h"), Ignored::Value),
            (raw("ban", "Ip", "1.2.3.4", "4 hours"), Ignored::Duration),
        ] {
            assert_eq!(r.check(), Err(why), "{r:?}");
        }
    }
}
