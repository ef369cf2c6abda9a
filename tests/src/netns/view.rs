//! What the kernel has attached to an interface, read from the kernel itself (netlink dumps
//! through `ip`/`tc`, and `BPF_PROG_QUERY`), independent of what wsguard believes it attached.

use anyhow::{Context as _, Result, bail, ensure};
use std::{ffi::CString, time::Duration};

use super::NetNs;

/// An XDP program attached to an interface, as the kernel reports it (`ip -j link`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpAttachment {
    pub prog_id: u32,
    /// `native`, `generic` or `offload`.
    pub mode: &'static str,
}

impl NetNs {
    /// Every XDP program attached to `iface` in this namespace (one per attach mode).
    pub fn xdp_attachments(&self, iface: &str) -> Result<Vec<XdpAttachment>> {
        let json: serde_json::Value =
            serde_json::from_str(&self.ip(&["-j", "link", "show", "dev", iface])?)
                .context("ip -j link: not JSON")?;
        let Some(xdp) = json.get(0).and_then(|l| l.get("xdp")) else {
            return Ok(Vec::new());
        };
        // `attached` lists each mode's program; `prog` (when present) repeats one of them.
        let attached = xdp
            .get("attached")
            .and_then(|a| a.as_array())
            .context("ip -j link: xdp without an attached list")?;
        attached
            .iter()
            .map(|a| {
                let mode = match a.get("mode").and_then(|m| m.as_u64()) {
                    Some(1) => "native",
                    Some(2) => "generic",
                    Some(3) => "offload",
                    m => bail!("unknown XDP attach mode {m:?}"),
                };
                let prog_id = a
                    .pointer("/prog/id")
                    .and_then(|i| i.as_u64())
                    .and_then(|i| u32::try_from(i).ok())
                    .context("XDP attachment without a program id")?;
                Ok(XdpAttachment { prog_id, mode })
            })
            .collect()
    }

    /// The ids of the BPF programs on `iface`'s egress hook, TCX (BPF_PROG_QUERY) and clsact
    /// filters (`tc -j filter`) together.
    pub fn tc_egress_programs(&self, iface: &str) -> Result<Vec<u32>> {
        let name = iface.to_owned();
        let mut ids = self.run(move || tcx_egress_query(&name))??;
        let out = self.exec(
            &["tc", "-j", "filter", "show", "dev", iface, "egress"],
            Duration::from_secs(10),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && !text.trim().is_empty() {
            let json: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("tc -j filter: {text}"))?;
            for f in json.as_array().into_iter().flatten() {
                if let Some(id) = f.pointer("/options/prog/id").and_then(|i| i.as_u64()) {
                    ids.push(u32::try_from(id)?);
                }
            }
        }
        Ok(ids)
    }
}

/// `BPF_PROG_QUERY` for `BPF_TCX_EGRESS` on an interface of the calling thread's namespace.
fn tcx_egress_query(iface: &str) -> Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_EGRESS: u32 = 47;
    #[repr(C)]
    #[derive(Default)]
    struct QueryAttr {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        count: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let c = CString::new(iface)?;
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(ifindex != 0, "no interface {iface}");
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_ifindex: ifindex,
        attach_type: BPF_TCX_EGRESS,
        prog_ids: ids.as_mut_ptr() as u64,
        count: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: a BPF_PROG_QUERY attribute of the kernel's layout; `prog_ids` has room for
    // `count` ids and outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>(),
        )
    };
    if rc != 0 {
        bail!(
            "BPF_PROG_QUERY tcx egress {iface}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(ids[..(attr.count as usize).min(ids.len())].to_vec())
}
