//! Attaching the programs to an interface: adopt what is pinned, swap it atomically through
//! the pinned link when asked, or attach fresh and pin. Links are never left owned by aya's
//! program objects, whose drop would detach them: fail-static means the process exiting (or
//! being killed) leaves every attachment in place.

use std::{collections::BTreeSet, fs};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode,
        links::{FdLink, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, qdisc_add_clsact},
        xdp::XdpLink,
    },
};
use wsguard_common::maps::programs;

use super::{
    DataPathError, XdpMode,
    loader::program,
    pins::{self, PinDir},
    sys,
};

pub(super) mod netlink;
mod rtnl;

fn other(msg: String) -> DataPathError {
    DataPathError::Other(msg)
}

pub struct XdpAttach {
    /// `native`, `generic`, `netlink-native`, `netlink-generic`.
    pub mode: String,
    pub prog_id: u32,
    /// The pinned attachment was not this generation's and was swapped (or attached fresh).
    pub changed: bool,
}

/// What an attachment must be to be adopted as is: pinned under `dir`, running a program that
/// uses the maps pinned there (`map_ids`). A program reading other maps (a crash between a
/// migration's swap and its renames, then a start of the older build) would ignore every ban
/// this generation writes, so it is swapped out even when the layout record says "ours".
pub struct Pinned<'a> {
    pub dir: &'a PinDir,
    pub map_ids: BTreeSet<u32>,
}

impl Pinned<'_> {
    /// Whether the attached program `prog_id` uses every pinned map that `ours` (this
    /// generation's program of the same kind) uses.
    fn runs_on_our_maps(&self, prog_id: u32, ours: u32) -> bool {
        let (Ok(theirs), Ok(ours)) = (sys::prog_map_ids(prog_id), sys::prog_map_ids(ours)) else {
            return false;
        };
        let theirs: BTreeSet<u32> = theirs.into_iter().collect();
        ours.iter()
            .filter(|id| self.map_ids.contains(id))
            .all(|id| theirs.contains(id))
    }
}

fn loaded_id(info: Result<aya::programs::ProgramInfo, aya::programs::ProgramError>) -> u32 {
    info.map(|i| i.id()).unwrap_or(0)
}

/// A pinned link for `ifindex` of `link_type`, or None (and the stale pin removed) when the
/// pin is missing, a record, or points at a link whose interface is gone.
fn live_pin(path: &std::path::Path, link_type: u32, ifindex: u32) -> Option<sys::LinkInfo> {
    if !path.exists() || pins::is_record(path) {
        return None;
    }
    let info = sys::obj_get(path).and_then(|fd| sys::link_info(&fd)).ok();
    match info {
        Some(i) if i.link_type == link_type && i.ifindex == ifindex => Some(i),
        _ => {
            // Defunct (interface deleted and recreated) or foreign: it enforces nothing.
            let _ = fs::remove_file(path);
            None
        }
    }
}

fn mode_name(mode: AyaXdpMode) -> &'static str {
    if mode == AyaXdpMode::Driver {
        "native"
    } else {
        "generic"
    }
}

pub fn xdp(
    ebpf: &mut Ebpf,
    pinned: Option<&Pinned<'_>>,
    iface: &str,
    want: XdpMode,
    replace: bool,
) -> Result<XdpAttach, DataPathError> {
    let ifindex =
        sys::ifindex(iface).ok_or_else(|| other(format!("no interface named {iface}")))?;
    let prog: &mut Xdp = program(ebpf, programs::XDP)?;
    if let Some(pinned) = pinned {
        let pins = pinned.dir;
        let pin = pins.xdp_link(iface);
        let recorded = pins::read_record(&pins.xdp_mode(iface)).unwrap_or_else(|| "unknown".into());
        if let Some(info) = live_pin(&pin, sys::LINK_TYPE_XDP, ifindex) {
            if !replace {
                if pinned.runs_on_our_maps(info.prog_id, loaded_id(prog.info())) {
                    return Ok(XdpAttach {
                        mode: recorded,
                        prog_id: info.prog_id,
                        changed: false,
                    });
                }
                tracing::warn!(
                    iface,
                    prog_id = info.prog_id,
                    "the attached XDP program does not use the pinned maps (an interrupted upgrade): swapping it"
                );
            }
            // bpf_link_update: the interface goes from the old program to the new one with no
            // packet in between. The attach mode cannot change this way; it stays as it was.
            let old = PinnedLink::from_pin(&pin)
                .map_err(|e| other(format!("open {}: {e}", pin.display())))?;
            let link = XdpLink::try_from(FdLink::from(old))
                .map_err(|e| other(format!("{}: {e}", pin.display())))?;
            let id = prog
                .attach_to_link(link)
                .map_err(|e| other(format!("replace XDP on {iface}: {e}")))?;
            let fd = FdLink::try_from(prog.take_link(id).map_err(|e| other(e.to_string()))?)
                .map_err(|e| other(e.to_string()))?;
            let prog_id = fd.info().map(|i| i.program_id()).unwrap_or(0);
            return Ok(XdpAttach {
                mode: recorded,
                prog_id,
                changed: true,
            });
        }
        if let Some(text) =
            pins::read_record(&pin).filter(|t| t.starts_with(netlink::RECORD_PREFIX))
        {
            let mode = netlink::record_mode(&text)
                .ok_or_else(|| other(format!("{}: unknown record {text:?}", pin.display())))?;
            if let Some(x) = netlink::existing(prog, pinned, iface, ifindex, &pin, mode, replace)? {
                return Ok(x);
            }
        }
    }
    let modes: &[AyaXdpMode] = match want {
        XdpMode::Auto => &[AyaXdpMode::Driver, AyaXdpMode::Skb],
        XdpMode::Native => &[AyaXdpMode::Driver],
        XdpMode::Generic => &[AyaXdpMode::Skb],
    };
    let mut errors = Vec::new();
    let intent = pinned.map(|p| p.dir.xdp_link(iface));
    for &mode in modes {
        if let Some(path) = &intent {
            // aya may fall back to netlink, which leaves nothing to pin: record the intent
            // first, so a crash right after the attach still leaves a record to follow.
            netlink::write_intent(path, netlink_mode(mode))?;
        }
        let id = match prog.attach_to_if_index(ifindex, mode) {
            Ok(id) => id,
            Err(e) => {
                errors.push(format!("{}: {e}", mode_name(mode)));
                continue;
            }
        };
        let link = prog.take_link(id).map_err(|e| other(e.to_string()))?;
        let Some(pins) = pinned.map(|p| p.dir) else {
            // Unpinned: nothing survives the process anyway; keep the link alive until exit.
            std::mem::forget(link);
            return Ok(XdpAttach {
                mode: mode_name(mode).into(),
                prog_id: loaded_id(prog.info()),
                changed: true,
            });
        };
        return match FdLink::try_from(link) {
            Ok(fd) => {
                let prog_id = fd.info().map(|i| i.program_id()).unwrap_or(0);
                // The mode record first: a pinned link must always have one.
                pins::write_record(&pins.xdp_mode(iface), mode_name(mode))
                    .map_err(|e| other(format!("record the XDP mode: {e}")))?;
                // The intent record makes way for the link (a crash in between closes the
                // link's only descriptor: nothing stays attached).
                let path = pins.xdp_link(iface);
                fs::remove_file(&path)
                    .map_err(|e| other(format!("remove {}: {e}", path.display())))?;
                fd.pin(&path)
                    .map_err(|e| other(format!("pin the XDP link of {iface}: {e}")))?;
                Ok(XdpAttach {
                    mode: mode_name(mode).into(),
                    prog_id,
                    changed: true,
                })
            }
            Err(_) => {
                // aya fell back to netlink (no XDP links in this kernel). The conversion
                // dropped aya's netlink handle without detaching; the attachment stays, and the
                // intent record written above now records it.
                let name = format!("netlink-{}", mode_name(mode));
                Ok(XdpAttach {
                    mode: name,
                    prog_id: loaded_id(prog.info()),
                    changed: true,
                })
            }
        };
    }
    if let Some(path) = &intent {
        let _ = fs::remove_file(path);
    }
    Err(other(format!(
        "attach XDP to {iface}: {}",
        errors.join("; ")
    )))
}

fn netlink_mode(mode: AyaXdpMode) -> netlink::Mode {
    if mode == AyaXdpMode::Driver {
        netlink::Mode::Native
    } else {
        netlink::Mode::Generic
    }
}

/// Returns `tcx` or `clsact`.
pub fn tc(
    ebpf: &mut Ebpf,
    pinned: Option<&Pinned<'_>>,
    iface: &str,
    replace: bool,
    force_clsact: bool,
) -> Result<&'static str, DataPathError> {
    let ifindex =
        sys::ifindex(iface).ok_or_else(|| other(format!("no interface named {iface}")))?;
    let prog: &mut SchedClassifier = program(ebpf, programs::TC_EGRESS)?;
    let pins = pinned.map(|p| p.dir);
    if let Some(pinned) = pinned {
        let pins = pinned.dir;
        let pin = pins.tc_link(iface);
        if let Some(info) = live_pin(&pin, sys::LINK_TYPE_TCX, ifindex) {
            let foreign =
                !replace && !pinned.runs_on_our_maps(info.prog_id, loaded_id(prog.info()));
            if foreign {
                tracing::warn!(
                    iface,
                    prog_id = info.prog_id,
                    "the attached TC program does not use the pinned maps (an interrupted upgrade): swapping it"
                );
            }
            if replace || foreign {
                let old = PinnedLink::from_pin(&pin)
                    .map_err(|e| other(format!("open {}: {e}", pin.display())))?;
                let link = SchedClassifierLink::try_from(FdLink::from(old))
                    .map_err(|e| other(format!("{}: {e}", pin.display())))?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(|e| other(format!("replace TC on {iface}: {e}")))?;
                // Still pinned: dropping our handle closes an fd, nothing more.
                drop(FdLink::try_from(
                    prog.take_link(id).map_err(|e| other(e.to_string()))?,
                ));
            }
            return Ok("tcx");
        }
        if let Some((priority, handle)) = pins::read_record(&pin)
            .as_deref()
            .and_then(pins::parse_clsact)
        {
            if !replace {
                return Ok("clsact");
            }
            // Netlink replace of the same filter (priority, handle): atomic in the kernel.
            let link =
                SchedClassifierLink::attached(iface, TcAttachType::Egress, priority, handle, None)
                    .map_err(|e| other(e.to_string()))?;
            if let Ok(id) = prog.attach_to_link(link) {
                // Its drop would remove the filter.
                std::mem::forget(prog.take_link(id).map_err(|e| other(e.to_string()))?);
                return Ok("clsact");
            }
            // The filter is gone (removed by hand): attach fresh below.
        }
    }
    if !force_clsact
        && let Ok(id) = prog.attach_with_options(
            iface,
            TcAttachType::Egress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
    {
        let link = prog.take_link(id).map_err(|e| other(e.to_string()))?;
        let Some(pins) = pins else {
            std::mem::forget(link);
            return Ok("tcx");
        };
        let fd = FdLink::try_from(link).map_err(|e| other(e.to_string()))?;
        fd.pin(pins.tc_link(iface))
            .map_err(|e| other(format!("pin the TC link of {iface}: {e}")))?;
        return Ok("tcx");
    }
    // Kernels before 6.6: a clsact qdisc and a netlink filter. The qdisc may already exist.
    let _ = qdisc_add_clsact(iface);
    let id = prog
        .attach_with_options(
            iface,
            TcAttachType::Egress,
            TcAttachOptions::Netlink(NlOptions::default()),
        )
        .map_err(|e| other(format!("attach TC egress to {iface}: {e}")))?;
    let link = prog.take_link(id).map_err(|e| other(e.to_string()))?;
    if let Some(pins) = pins {
        let (priority, handle) = (link.priority(), link.handle());
        if let (Ok(p), Ok(h)) = (priority, handle) {
            pins::write_record(&pins.tc_link(iface), &pins::clsact_record(p, h))
                .map_err(|e| other(format!("record the clsact filter: {e}")))?;
        }
    }
    // Dropping it would remove the filter: fail-static keeps it.
    std::mem::forget(link);
    Ok("clsact")
}

/// Whether the live XDP link pinned for `iface` runs a program on this generation's maps;
/// None when no live XDP link is pinned for it.
pub fn pinned_xdp_is_ours(
    ebpf: &mut Ebpf,
    pinned: &Pinned<'_>,
    iface: &str,
) -> Result<Option<bool>, DataPathError> {
    let Some(ifindex) = sys::ifindex(iface) else {
        return Ok(None);
    };
    let prog: &mut Xdp = program(ebpf, programs::XDP)?;
    let ours = loaded_id(prog.info());
    let pin = pinned.dir.xdp_link(iface);
    if let Some(mode) = pins::read_record(&pin).and_then(|t| netlink::record_mode(&t)) {
        return Ok(netlink::attached_is_ours(pinned, ifindex, mode, ours));
    }
    Ok(live_pin(&pin, sys::LINK_TYPE_XDP, ifindex)
        .map(|info| pinned.runs_on_our_maps(info.prog_id, ours)))
}

/// Interfaces with pinned links that were not asked for this time.
pub fn pinned_interfaces(pins: &PinDir) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(pins.links())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            pins::parse_link_name(&n).map(|(iface, _)| iface)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}
