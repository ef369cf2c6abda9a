//! The few rtnetlink requests wsguard needs for XDP attached through netlink: which program
//! an interface runs in a mode (`RTM_GETLINK`), and compare-and-replace or compare-and-remove
//! of it (`RTM_SETLINK` with `XDP_FLAGS_REPLACE` and `IFLA_XDP_EXPECTED_FD`, Linux 5.7).

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

const IFLA_XDP: u16 = 43;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_FLAGS: u16 = 3;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
const IFLA_XDP_EXPECTED_FD: u16 = 8;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const XDP_FLAGS_REPLACE: u32 = 1 << 4;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;

/// The XDP attach mode a record names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Native,
    Generic,
}

impl Mode {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "native" => Some(Self::Native),
            "generic" => Some(Self::Generic),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }

    fn flags(self) -> u32 {
        match self {
            Self::Native => XDP_FLAGS_DRV_MODE,
            Self::Generic => XDP_FLAGS_SKB_MODE,
        }
    }

    fn prog_id_attr(self) -> u16 {
        match self {
            Self::Native => IFLA_XDP_DRV_PROG_ID,
            Self::Generic => IFLA_XDP_SKB_PROG_ID,
        }
    }
}

/// The id of the program attached to `ifindex` in `mode` (0: none).
pub(super) fn prog_id(ifindex: u32, mode: Mode) -> io::Result<u32> {
    let reply = request(libc::RTM_GETLINK, ifindex, &[])?;
    let Some(attrs) = reply.get(NLMSG_HDR + IFINFOMSG..) else {
        return Ok(0);
    };
    let Some(xdp) = find_attr(attrs, IFLA_XDP) else {
        return Ok(0);
    };
    Ok(find_attr(xdp, mode.prog_id_attr())
        .and_then(|v| v.get(..4))
        .map(|v| u32::from_ne_bytes(v.try_into().expect("4 bytes")))
        .unwrap_or(0))
}

/// Replace `old` by `new` on `ifindex` in one kernel operation; fails (EEXIST) when `old` is not
/// what is attached.
pub(super) fn swap(
    ifindex: u32,
    new: BorrowedFd<'_>,
    old: BorrowedFd<'_>,
    mode: Mode,
) -> io::Result<()> {
    let mut xdp = Vec::new();
    put_attr(&mut xdp, IFLA_XDP_FD, &new.as_raw_fd().to_ne_bytes());
    put_attr(
        &mut xdp,
        IFLA_XDP_FLAGS,
        &(mode.flags() | XDP_FLAGS_REPLACE).to_ne_bytes(),
    );
    put_attr(
        &mut xdp,
        IFLA_XDP_EXPECTED_FD,
        &old.as_raw_fd().to_ne_bytes(),
    );
    setlink_xdp(ifindex, &xdp)
}

/// Detach the program of `mode` from `ifindex`, only if it is `expected` when given.
pub(super) fn remove(ifindex: u32, expected: Option<BorrowedFd<'_>>, mode: Mode) -> io::Result<()> {
    let mut xdp = Vec::new();
    put_attr(&mut xdp, IFLA_XDP_FD, &(-1i32).to_ne_bytes());
    let mut flags = mode.flags();
    if expected.is_some() {
        flags |= XDP_FLAGS_REPLACE;
    }
    put_attr(&mut xdp, IFLA_XDP_FLAGS, &flags.to_ne_bytes());
    if let Some(fd) = expected {
        put_attr(
            &mut xdp,
            IFLA_XDP_EXPECTED_FD,
            &fd.as_raw_fd().to_ne_bytes(),
        );
    }
    setlink_xdp(ifindex, &xdp)
}

fn setlink_xdp(ifindex: u32, xdp: &[u8]) -> io::Result<()> {
    let mut attrs = Vec::new();
    put_attr(&mut attrs, IFLA_XDP | NLA_F_NESTED, xdp);
    request(libc::RTM_SETLINK, ifindex, &attrs).map(drop)
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn put_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

/// The payload of the first attribute of type `kind` in a run of attributes.
fn find_attr(mut attrs: &[u8], kind: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if ty == kind {
            return Some(&attrs[4..len]);
        }
        attrs = attrs.get(align4(len)..)?;
    }
    None
}

/// One rtnetlink request about `ifindex` with `attrs`, acknowledged; returns the reply message
/// (for RTM_GETLINK, the RTM_NEWLINK) or an empty one.
fn request(kind: u16, ifindex: u32, attrs: &[u8]) -> io::Result<Vec<u8>> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // A kernel that never answers must not hang the agent's start.
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: a valid timeval of the given size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
    let len = NLMSG_HDR + IFINFOMSG + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    // struct ifinfomsg: family, pad, type, index, flags, change.
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    msg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    msg.extend_from_slice(&[0; 8]);
    msg.extend_from_slice(attrs);
    // SAFETY: all-zero sockaddr_nl addresses the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: a valid buffer and address of the given sizes.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // The reply (if any) and the acknowledgement; a few datagrams at most.
    for _ in 0..8 {
        // SAFETY: a valid buffer of the given size.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= NLMSG_HDR {
            let mlen = u32::from_ne_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            let mtype = u16::from_ne_bytes([rest[4], rest[5]]);
            if mlen < NLMSG_HDR || mlen > rest.len() {
                return Err(io::Error::other("truncated netlink reply"));
            }
            let m = &rest[..mlen];
            if mtype == libc::NLMSG_ERROR as u16 {
                let code = m
                    .get(NLMSG_HDR..NLMSG_HDR + 4)
                    .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                    .unwrap_or(-libc::EIO);
                return if code == 0 {
                    Ok(reply)
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                };
            }
            if mtype == libc::RTM_NEWLINK {
                reply = m.to_vec();
            }
            rest = rest.get(align4(mlen)..).unwrap_or_default();
        }
    }
    Err(io::Error::other("no acknowledgement from the kernel"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip() {
        let mut buf = Vec::new();
        put_attr(&mut buf, 5, &[1, 2, 3]);
        put_attr(&mut buf, IFLA_XDP | NLA_F_NESTED, &7u32.to_ne_bytes());
        assert_eq!(buf.len(), 16);
        assert_eq!(find_attr(&buf, 5), Some(&[1, 2, 3][..]));
        assert_eq!(find_attr(&buf, IFLA_XDP), Some(&7u32.to_ne_bytes()[..]));
        assert_eq!(find_attr(&buf, 9), None);
        assert_eq!(find_attr(&buf[..6], 5), None);
    }
}
