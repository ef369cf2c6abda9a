//! XDP attached through netlink, where the kernel has no XDP links (before 5.9) and aya falls
//! back to `RTM_SETLINK`. Such an attachment cannot be pinned, but it can still be found and
//! handled without a gap: the kernel tells which program an interface runs (`RTM_GETLINK`), and
//! swaps or removes it only if it is still the expected one (`XDP_FLAGS_REPLACE` with
//! `IFLA_XDP_EXPECTED_FD`, Linux 5.7), so a program wsguard does not own is never touched.
//!
//! The pin directory keeps a record `links/<iface>_xdp -> "netlink:<mode>"` in place of the
//! link. It is written before aya attaches (an intent), so a crash right after a netlink attach
//! still leaves a record that the next start follows; a record whose interface runs no program
//! in that mode is stale and removed.

use std::{os::fd::AsFd as _, path::Path};

use aya::programs::{ProgramFd, Xdp, loaded_programs};
use wsguard_common::maps::programs;

pub use super::rtnl::Mode;
use super::{
    DataPathError, Pinned, XdpAttach, loaded_id, other, pins,
    rtnl::{prog_id, remove, swap},
};

pub const RECORD_PREFIX: &str = "netlink:";

/// The mode of a `netlink:<mode>` record.
pub fn record_mode(text: &str) -> Option<Mode> {
    text.strip_prefix(RECORD_PREFIX).and_then(Mode::parse)
}

pub fn record(mode: Mode) -> String {
    format!("{RECORD_PREFIX}{}", mode.name())
}

/// A kernel program name: the object's name cut to BPF_OBJ_NAME_LEN - 1 bytes.
fn is_wsguard_xdp(name: &str) -> bool {
    !name.is_empty() && name == &programs::XDP[..programs::XDP.len().min(15)]
}

/// The program `id` if it is wsguard's XDP program (by its kernel name), with a descriptor.
fn wsguard_prog(id: u32) -> Option<ProgramFd> {
    let info = loaded_programs().flatten().find(|p| p.id() == id)?;
    if !info.name_as_str().is_some_and(is_wsguard_xdp) {
        return None;
    }
    info.fd().ok()
}

/// What a pinned start does with an interface whose record says netlink: adopt the attached
/// program when it is this generation's, else swap it atomically. None when the record is
/// stale (nothing attached in that mode): it is removed and the caller attaches afresh.
pub(super) fn existing(
    prog: &mut Xdp,
    pinned: &Pinned<'_>,
    iface: &str,
    ifindex: u32,
    record_path: &Path,
    mode: Mode,
    replace: bool,
) -> Result<Option<XdpAttach>, DataPathError> {
    let id = prog_id(ifindex, mode).map_err(|e| {
        other(format!(
            "read the XDP program of {iface} (RTM_GETLINK): {e}"
        ))
    })?;
    if id == 0 {
        tracing::warn!(
            iface,
            mode = mode.name(),
            "the recorded netlink XDP attachment is gone (removed by hand?): attaching afresh"
        );
        std::fs::remove_file(record_path)
            .map_err(|e| other(format!("remove {}: {e}", record_path.display())))?;
        return Ok(None);
    }
    let ours = loaded_id(prog.info());
    let name = format!("netlink-{}", mode.name());
    if !replace {
        if pinned.runs_on_our_maps(id, ours) {
            return Ok(Some(XdpAttach {
                mode: name,
                prog_id: id,
                changed: false,
            }));
        }
        tracing::warn!(
            iface,
            prog_id = id,
            "the attached XDP program does not use the pinned maps (an interrupted upgrade): swapping it"
        );
    }
    let old = wsguard_prog(id).ok_or_else(|| {
        other(format!(
            "XDP on {iface} runs program {id}, which is not wsguard's, where wsguard recorded its \
             netlink attachment: left alone; remove it (`ip link set dev {iface} xdp off`) or \
             protect another interface"
        ))
    })?;
    let new = prog.fd().map_err(|e| other(e.to_string()))?;
    swap(ifindex, new.as_fd(), old.as_fd(), mode).map_err(|e| {
        other(format!(
            "XDP on {iface} is attached through netlink and could not be swapped atomically \
             ({e}); program {id} keeps enforcing. To run this build anyway: `wsguard detach`, \
             then start the agent again (nothing is filtered in between)"
        ))
    })?;
    tracing::info!(
        iface,
        old = id,
        new = ours,
        "netlink XDP attachment swapped atomically"
    );
    Ok(Some(XdpAttach {
        mode: name,
        prog_id: ours,
        changed: true,
    }))
}

/// Whether the program attached through netlink on `ifindex` runs on this generation's maps;
/// None when nothing is attached in that mode.
pub(super) fn attached_is_ours(
    pinned: &Pinned<'_>,
    ifindex: u32,
    mode: Mode,
    ours: u32,
) -> Option<bool> {
    match prog_id(ifindex, mode) {
        Ok(0) | Err(_) => None,
        Ok(id) => Some(pinned.runs_on_our_maps(id, ours)),
    }
}

/// The kill switch for one netlink record: remove wsguard's program from `iface` (only if it
/// is still the one attached). Another program found there is not wsguard's and stays.
pub fn remove_recorded(iface: &str, ifindex: u32, mode: Mode) -> Result<(), String> {
    let id = prog_id(ifindex, mode).map_err(|e| format!("read the XDP program of {iface}: {e}"))?;
    if id == 0 {
        return Ok(());
    }
    let Some(fd) = wsguard_prog(id) else {
        tracing::warn!(
            iface,
            prog_id = id,
            "the XDP program attached through netlink is not wsguard's: left in place"
        );
        return Ok(());
    };
    match remove(ifindex, Some(fd.as_fd()), mode) {
        // Before Linux 5.7 the kernel knows no compare-and-replace: remove by mode, as aya does.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => remove(ifindex, None, mode),
        r => r,
    }
    .map_err(|e| {
        format!(
            "remove the netlink XDP attachment (program {id}): {e}; run `ip link set dev {iface} \
             {} off`",
            if mode == Mode::Native {
                "xdpdrv"
            } else {
                "xdpgeneric"
            }
        )
    })
}

/// Write the intent record before aya may attach through netlink.
pub(super) fn write_intent(path: &Path, mode: Mode) -> Result<(), DataPathError> {
    pins::write_record(path, &record(mode))
        .map_err(|e| other(format!("record the XDP attachment: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        for m in [Mode::Native, Mode::Generic] {
            assert_eq!(record_mode(&record(m)), Some(m));
        }
        assert_eq!(record_mode("netlink:offload"), None);
        assert_eq!(record_mode("clsact:1:2"), None);
        assert!(is_wsguard_xdp(
            &programs::XDP[..programs::XDP.len().min(15)]
        ));
        assert!(!is_wsguard_xdp("") && !is_wsguard_xdp("xdp_other"));
    }
}
