//! Attaching the programs to an interface: adopt what is pinned, swap it atomically through
//! the pinned link when asked, or attach fresh and pin. Links are never left owned by aya's
//! program objects, whose drop would detach them: fail-static means the process exiting (or
//! being killed) leaves every attachment in place.

use std::fs;

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

fn other(msg: String) -> DataPathError {
    DataPathError::Other(msg)
}

pub struct XdpAttach {
    /// `native`, `generic`, `netlink-native`, `netlink-generic`.
    pub mode: String,
    pub prog_id: u32,
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
    pins: Option<&PinDir>,
    iface: &str,
    want: XdpMode,
    replace: bool,
) -> Result<XdpAttach, DataPathError> {
    let ifindex =
        sys::ifindex(iface).ok_or_else(|| other(format!("no interface named {iface}")))?;
    let prog: &mut Xdp = program(ebpf, programs::XDP)?;
    if let Some(pins) = pins {
        let pin = pins.xdp_link(iface);
        let recorded = pins::read_record(&pins.xdp_mode(iface)).unwrap_or_else(|| "unknown".into());
        if let Some(info) = live_pin(&pin, sys::LINK_TYPE_XDP, ifindex) {
            if !replace {
                return Ok(XdpAttach {
                    mode: recorded,
                    prog_id: info.prog_id,
                });
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
            });
        }
        if let Some(mode) =
            pins::read_record(&pin).and_then(|t| t.strip_prefix("netlink:").map(str::to_owned))
        {
            if !replace {
                let prog_id = prog.info().map(|i| i.id()).unwrap_or(0);
                return Ok(XdpAttach {
                    mode: format!("netlink-{mode}"),
                    prog_id,
                });
            }
            return Err(other(format!(
                "XDP on {iface} is attached through netlink, which cannot be replaced atomically: run `wsguard detach`, then start the agent again"
            )));
        }
    }
    let modes: &[AyaXdpMode] = match want {
        XdpMode::Auto => &[AyaXdpMode::Driver, AyaXdpMode::Skb],
        XdpMode::Native => &[AyaXdpMode::Driver],
        XdpMode::Generic => &[AyaXdpMode::Skb],
    };
    let mut errors = Vec::new();
    for &mode in modes {
        let id = match prog.attach_to_if_index(ifindex, mode) {
            Ok(id) => id,
            Err(e) => {
                errors.push(format!("{}: {e}", mode_name(mode)));
                continue;
            }
        };
        let link = prog.take_link(id).map_err(|e| other(e.to_string()))?;
        let Some(pins) = pins else {
            // Unpinned: nothing survives the process anyway; keep the link alive until exit.
            std::mem::forget(link);
            return Ok(XdpAttach {
                mode: mode_name(mode).into(),
                prog_id: prog.info().map(|i| i.id()).unwrap_or(0),
            });
        };
        return match FdLink::try_from(link) {
            Ok(fd) => {
                let prog_id = fd.info().map(|i| i.program_id()).unwrap_or(0);
                // The mode record first: a pinned link must always have one.
                pins::write_record(&pins.xdp_mode(iface), mode_name(mode))
                    .map_err(|e| other(format!("record the XDP mode: {e}")))?;
                fd.pin(pins.xdp_link(iface))
                    .map_err(|e| other(format!("pin the XDP link of {iface}: {e}")))?;
                Ok(XdpAttach {
                    mode: mode_name(mode).into(),
                    prog_id,
                })
            }
            Err(_) => {
                // aya fell back to netlink (no XDP links in this kernel). The conversion
                // dropped aya's netlink handle without detaching; the attachment stays.
                let name = format!("netlink-{}", mode_name(mode));
                pins::write_record(
                    &pins.xdp_link(iface),
                    &format!("netlink:{}", mode_name(mode)),
                )
                .map_err(|e| other(format!("record the netlink attachment: {e}")))?;
                Ok(XdpAttach {
                    mode: name,
                    prog_id: prog.info().map(|i| i.id()).unwrap_or(0),
                })
            }
        };
    }
    Err(other(format!(
        "attach XDP to {iface}: {}",
        errors.join("; ")
    )))
}

/// Returns `tcx` or `clsact`.
pub fn tc(
    ebpf: &mut Ebpf,
    pins: Option<&PinDir>,
    iface: &str,
    replace: bool,
    force_clsact: bool,
) -> Result<&'static str, DataPathError> {
    let ifindex =
        sys::ifindex(iface).ok_or_else(|| other(format!("no interface named {iface}")))?;
    let prog: &mut SchedClassifier = program(ebpf, programs::TC_EGRESS)?;
    if let Some(pins) = pins {
        let pin = pins.tc_link(iface);
        if live_pin(&pin, sys::LINK_TYPE_TCX, ifindex).is_some() {
            if replace {
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
