//! The allowlist: built-ins (loopback, link-local, the node's own addresses), config entries,
//! trusted PROXY senders (`proxy_protocol_from`, see `crate::proxy`) and API entries. Only API
//! entries can be removed through the API: built-ins protect the node itself, and config and
//! proxy entries would come back at the next start anyway.

use crate::{
    addr::Cidr,
    model::{AllowEntry, AllowSource},
};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllowError {
    #[error(
        "refusing to allowlist {0}: a /0 entry would disable wsguard (use `wsguard detach` or observe mode)"
    )]
    Everything(Cidr),
    #[error("{cidr} is a {} allowlist entry and cannot be removed through the API{}", kind.as_str(), hint(*kind))]
    Protected { cidr: Cidr, kind: AllowSource },
}

fn hint(s: AllowSource) -> &'static str {
    match s {
        AllowSource::Config => ": remove it from the agent's config",
        AllowSource::Proxy => {
            ": it is a trusted PROXY protocol sender; remove it from proxy_protocol_from in the \
             agent's config"
        }
        _ => "",
    }
}

/// Loopback and link-local, both families.
pub fn builtin_ranges() -> Vec<(Cidr, &'static str)> {
    [
        ("127.0.0.0/8", "loopback"),
        ("::1", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("fe80::/10", "link-local"),
    ]
    .into_iter()
    .map(|(c, r)| (c.parse().expect("valid built-in"), r))
    .collect()
}

#[derive(Debug)]
pub(super) struct Allowlist {
    fixed: Vec<AllowEntry>,
    proxy: Vec<AllowEntry>,
    node: Vec<AllowEntry>,
    manual: Vec<AllowEntry>,
}

impl Allowlist {
    pub(super) fn new(builtin: &[Cidr], config: &[Cidr]) -> Self {
        let mut fixed: Vec<AllowEntry> = builtin_ranges()
            .into_iter()
            .map(|(cidr, r)| AllowEntry {
                cidr,
                source: AllowSource::Builtin,
                reason: r.into(),
            })
            .collect();
        for c in config {
            if !fixed.iter().any(|e| e.cidr == *c) {
                let reason = "agent config".to_owned();
                fixed.push(AllowEntry {
                    cidr: *c,
                    source: AllowSource::Config,
                    reason,
                });
            }
        }
        let mut list = Self {
            fixed,
            proxy: Vec::new(),
            node: Vec::new(),
            manual: Vec::new(),
        };
        list.set_node(builtin);
        list
    }

    pub(super) fn entries(&self) -> impl Iterator<Item = &AllowEntry> {
        self.fixed
            .iter()
            .chain(&self.proxy)
            .chain(&self.node)
            .chain(&self.manual)
    }

    pub(super) fn overlapping(&self, cidr: &Cidr) -> Option<&AllowEntry> {
        // The family test first: it is cheap, and a batch of 1M bans asks this twice each.
        self.entries()
            .find(|e| e.cidr.is_v4() == cidr.is_v4() && e.cidr.overlaps(cidr))
    }

    pub(super) fn add(
        &mut self,
        cidr: Cidr,
        source: AllowSource,
        reason: String,
    ) -> Result<AllowEntry, AllowError> {
        if cidr.is_everything() {
            return Err(AllowError::Everything(cidr));
        }
        if let Some(m) = self.manual.iter_mut().find(|e| e.cidr == cidr) {
            m.reason = reason;
            return Ok(m.clone());
        }
        if let Some(e) = self.entries().find(|e| e.cidr == cidr) {
            return Ok(e.clone());
        }
        let e = AllowEntry {
            cidr,
            source,
            reason,
        };
        self.manual.push(e.clone());
        Ok(e)
    }

    pub(super) fn remove_manual(&mut self, cidr: &Cidr) -> Result<Option<AllowEntry>, AllowError> {
        if let Some(i) = self.manual.iter().position(|e| e.cidr == *cidr) {
            return Ok(Some(self.manual.remove(i)));
        }
        match self
            .fixed
            .iter()
            .chain(&self.proxy)
            .chain(&self.node)
            .find(|e| e.cidr == *cidr)
        {
            Some(e) => Err(AllowError::Protected {
                cidr: *cidr,
                kind: e.source,
            }),
            None => Ok(None),
        }
    }

    /// Replace the trusted PROXY senders; returns the ones that are new.
    pub(super) fn set_proxy(&mut self, cidrs: &[Cidr]) -> Vec<Cidr> {
        let added: Vec<Cidr> = cidrs
            .iter()
            .filter(|c| !self.proxy.iter().any(|e| e.cidr == **c))
            .copied()
            .collect();
        self.proxy = cidrs
            .iter()
            .map(|c| AllowEntry {
                cidr: *c,
                source: AllowSource::Proxy,
                reason: crate::proxy::ALLOW_REASON.into(),
            })
            .collect();
        added
    }

    /// Replace the node-address entries; returns the ones that are new.
    pub(super) fn set_node(&mut self, addrs: &[Cidr]) -> Vec<Cidr> {
        let added: Vec<Cidr> = addrs
            .iter()
            .filter(|c| !self.node.iter().any(|e| e.cidr == **c))
            .copied()
            .collect();
        self.node = addrs
            .iter()
            .map(|c| AllowEntry {
                cidr: *c,
                source: AllowSource::Builtin,
                reason: "node address".into(),
            })
            .collect();
        added
    }
}
