//! `DataPath::open`: adopt, upgrade or migrate what is pinned, or start fresh.
//!
//! Order matters everywhere below: maps are filled before any program that reads them is
//! attached, a new program is swapped in through the pinned link (never detach, then attach),
//! and pins are replaced only after the swap. A crash at any point leaves either the old or
//! the new generation enforcing, and the next start redoes the remaining steps.

use std::fs;

use aya::maps::{Map, MapData, MapInfo};
use wsguard_common::maps::{Config, LAYOUT_VERSION, names};

use super::{
    DataPath, DataPathError, DataPathOptions, OpenHooks,
    attach::{self, Pinned},
    loader,
    maps::Maps,
    pins::{Layout, PinDir, mkdir_0700},
    sys,
};
use crate::api::InterfaceJson;

fn other(msg: String) -> DataPathError {
    DataPathError::Other(msg)
}

fn from_ebpf(ebpf: &mut aya::Ebpf) -> impl FnMut(&str) -> Result<Map, DataPathError> + '_ {
    |name| {
        ebpf.take_map(names::in_object(name))
            .ok_or_else(|| other(format!("map {name} missing from the object")))
    }
}

fn from_pins(dir: std::path::PathBuf) -> impl FnMut(&str) -> Result<Map, DataPathError> {
    move |name| {
        let data = MapData::from_pin(dir.join(name))
            .map_err(|e| other(format!("open pinned {name}: {e}")))?;
        Map::from_map_data(data).map_err(|e| other(format!("pinned {name}: {e}")))
    }
}

/// Unpin everything in a directory of map pins (maps in use stay alive through their users).
fn clear(dir: &std::path::Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
}

pub fn open(opts: &DataPathOptions, hooks: &OpenHooks) -> Result<DataPath, DataPathError> {
    let pins = PinDir::new(&opts.pin_dir);
    pins.ensure()?;
    let pins = pins.lock()?;
    let me = Layout {
        version: hooks.layout_version.unwrap_or(LAYOUT_VERSION),
        build: hooks.build_id.unwrap_or_else(loader::build_id),
    };
    let recorded = pins.read_layout();
    // Maps pinned without a layout record: a first start died before writing it. Copying is
    // always safe, so treat it as a migration.
    let reason = if !pins.has_maps() {
        None
    } else if recorded.map(|l| l.version) != Some(me.version) {
        Some(format!(
            "pinned layout {:?}, this build {}",
            recorded.map(|l| l.version),
            me.version
        ))
    } else {
        loader::pinned_mismatch(&pins.maps(), opts.max_bans)
    };
    let migrate = reason.is_some();
    let replace = migrate || recorded.map(|l| l.build) != Some(me.build);
    if let Some(reason) = &reason {
        tracing::warn!(%reason, "migrating the pinned maps into fresh ones before the program swap");
        clear(&pins.maps_new());
        mkdir_0700(&pins.maps_new())
            .map_err(|e| other(format!("create {}: {e}", pins.maps_new().display())))?;
    }
    let map_dir = if migrate {
        pins.maps_new()
    } else {
        pins.maps()
    };
    let mut ebpf = loader::load(Some(&map_dir), opts.max_bans)?;
    let mut maps = Maps::take(from_ebpf(&mut ebpf))?;
    let mut pending = Vec::new();
    let mut old = None;
    if migrate {
        let o = Maps::take_previous(from_pins(pins.maps()))?;
        if let Err(e) = o.copy_into(&mut maps, me.version) {
            // The old generation keeps enforcing untouched.
            clear(&pins.maps_new());
            let _ = fs::remove_dir(pins.maps_new());
            return Err(other(format!(
                "migrating the pinned maps failed, nothing was swapped: {e}"
            )));
        }
        old = Some(o);
    } else if maps.config()?.layout_version == 0 {
        // Fresh maps: a zero CONFIG would mean a zero window and threshold until the daemon
        // writes its own, so give the program the defaults before it is attached.
        maps.write_config(&Config {
            layout_version: me.version,
            ..Config::new()
        })?;
    }
    if replace && !migrate {
        // Before this build's program reads the pinned host filter: another build may have
        // left it stale. The open refills it (`DataPath::assemble`).
        super::prefilter::clear_host_filter(maps.host_filter()?)?;
        // Another build ran: if it knew no table, it changed BANS_V4 behind it, and this
        // build's program probes the table first. Slots whose ban is gone go before the swap;
        // the open's walk fixes the rest.
        maps.sweep_table()?;
    }

    let map_ids = loader::PINNED_MAPS
        .iter()
        .filter_map(|name| MapInfo::from_pin(map_dir.join(name)).ok())
        .map(|i| i.id())
        .collect();
    let pinned = Pinned {
        dir: &pins,
        map_ids,
    };
    let mut interfaces = Vec::new();
    let mut netlink_fallbacks = 0;
    for iface in &opts.interfaces {
        let x = attach::xdp(&mut ebpf, Some(&pinned), iface, opts.xdp_mode, replace)?;
        if x.mode.starts_with("netlink") {
            netlink_fallbacks += 1;
            tracing::error!(iface, mode = %x.mode, "XDP fell back to a netlink attachment (no XDP links in this kernel): nothing is pinned, restarts find and swap it through netlink");
        }
        // A swapped XDP program takes its TC partner along: both must read the same maps.
        let tc = attach::tc(
            &mut ebpf,
            Some(&pinned),
            iface,
            replace || x.changed,
            hooks.force_clsact,
        )?;
        interfaces.push(InterfaceJson {
            name: iface.clone(),
            xdp_mode: x.mode,
            xdp_prog_id: x.prog_id,
            tc_egress: tc.into(),
        });
    }
    // Interfaces attached by an earlier run but not asked for now keep enforcing; when their
    // program is swapped, they must run this generation too, or they would keep reading maps
    // that are about to be unpinned.
    for iface in attach::pinned_interfaces(&pins) {
        if opts.interfaces.contains(&iface) || sys::ifindex(&iface).is_none() {
            continue;
        }
        match attach::pinned_xdp_is_ours(&mut ebpf, &pinned, &iface)? {
            Some(ours) if replace || !ours => {
                attach::xdp(&mut ebpf, Some(&pinned), &iface, opts.xdp_mode, true)?;
                attach::tc(&mut ebpf, Some(&pinned), &iface, true, hooks.force_clsact)?;
            }
            _ => {}
        }
    }
    if migrate {
        for name in loader::PINNED_MAPS {
            let (from, to) = (pins.maps_new().join(name), pins.maps().join(name));
            fs::rename(&from, &to).map_err(|e| {
                other(format!(
                    "move {} over {}: {e}",
                    from.display(),
                    to.display()
                ))
            })?;
        }
        let _ = fs::remove_dir(pins.maps_new());
        if let Some(mut o) = old {
            // Events the old program queued before the swap.
            o.drain_bursts(&mut pending, 1 << 16);
        }
    }
    pins.write_layout(&me)
        .map_err(|e| other(format!("record the layout: {e}")))?;
    if !migrate && pins.maps_new().exists() {
        // Fresh maps of a migration that died before its renames: every program now runs on
        // `maps/`, so they only hold memory.
        tracing::warn!(dir = %pins.maps_new().display(), "removing the maps of an interrupted migration");
        clear(&pins.maps_new());
        let _ = fs::remove_dir(pins.maps_new());
    }
    // The programs stay attached through their pinned links; aya's handles are not needed.
    drop(ebpf);
    DataPath::assemble(
        maps,
        Some(pins),
        opts,
        interfaces,
        netlink_fallbacks,
        pending,
    )
}

/// Without bpffs: nothing is pinned and nothing survives the process (observe mode only).
pub fn open_unpinned(opts: &DataPathOptions) -> Result<DataPath, DataPathError> {
    let mut ebpf = loader::load(None, opts.max_bans)?;
    let mut maps = Maps::take(from_ebpf(&mut ebpf))?;
    maps.write_config(&Config::new())?;
    let mut interfaces = Vec::new();
    for iface in &opts.interfaces {
        let x = attach::xdp(&mut ebpf, None, iface, opts.xdp_mode, false)?;
        let tc = attach::tc(&mut ebpf, None, iface, false, false)?;
        interfaces.push(InterfaceJson {
            name: iface.clone(),
            xdp_mode: x.mode,
            xdp_prog_id: x.prog_id,
            tc_egress: tc.into(),
        });
    }
    drop(ebpf);
    DataPath::assemble(maps, None, opts, interfaces, 0, Vec::new())
}
