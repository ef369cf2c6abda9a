//! Who is on the other end of the socket (SO_PEERCRED), and whether they may mutate.

use axum::{extract::connect_info::Connected, serve::IncomingStream};
use tokio::net::UnixListener;

use crate::api::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// `None` when the kernel would not tell: treated as unprivileged.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<i32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(c) => Peer {
                uid: Some(c.uid()),
                gid: Some(c.gid()),
                pid: c.pid(),
            },
            Err(_) => Peer {
                uid: None,
                gid: None,
                pid: None,
            },
        }
    }
}

impl Peer {
    pub fn check_mutate(&self, mutate_gid: Option<u32>) -> Result<(), ApiError> {
        if self.uid == Some(0) {
            return Ok(());
        }
        if let Some(g) = mutate_gid
            && (self.gid == Some(g) || self.pid.is_some_and(|p| supplementary(p).contains(&g)))
        {
            return Ok(());
        }
        let who = self
            .uid
            .map_or_else(|| "an unknown user".to_owned(), |u| format!("uid {u}"));
        Err(ApiError::denied(match mutate_gid {
            Some(g) => format!(
                "permission denied: mutating wsguard needs root or group {g} (you are {who}); run as root"
            ),
            None => format!(
                "permission denied: mutating wsguard needs root (you are {who}); run as root"
            ),
        }))
    }
}

/// The peer process's supplementary groups, best effort: the process may be gone already, and
/// then only its primary gid counts.
fn supplementary(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            uid: Some(uid),
            gid: Some(gid),
            pid: None,
        }
    }

    #[test]
    fn root_or_group_may_mutate() {
        assert!(peer(0, 0).check_mutate(None).is_ok());
        assert!(peer(1000, 50).check_mutate(Some(50)).is_ok());
        let e = peer(1000, 51).check_mutate(Some(50)).unwrap_err();
        assert!(
            e.message.contains("needs root or group 50"),
            "{}",
            e.message
        );
        assert!(peer(1000, 50).check_mutate(None).is_err());
        let unknown = Peer {
            uid: None,
            gid: None,
            pid: None,
        };
        assert!(unknown.check_mutate(Some(0)).is_err());
    }

    #[test]
    fn supplementary_groups_of_this_process() {
        let me = std::process::id() as i32;
        // Whatever they are, they parse; a vanished pid gives none.
        let _ = supplementary(me);
        assert!(supplementary(i32::MAX).is_empty());
    }
}
