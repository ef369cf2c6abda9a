//! The pin directory: where maps and links live on bpffs, the layout record, and the kill switch.
//!
//! bpffs holds only pins, directories and symlinks (no regular files), so the small records
//! wsguard keeps there are symlinks whose target is the text. bpffs also refuses names with a
//! dot (EPERM, reserved by the kernel), so interface names are escaped in pin names.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use aya::programs::{
    Link as _,
    tc::{SchedClassifierLink, TcAttachType, TcHandle},
};

use super::{DataPathError, attach::netlink, sys};

pub const MAPS: &str = "maps";
/// Fresh maps of a migration, filled before the program swap, renamed over `maps/` after it.
pub const MAPS_NEW: &str = "maps_new";
pub const LINKS: &str = "links";
pub const LAYOUT: &str = "layout";
pub const XDP_SUFFIX: &str = "_xdp";
pub const TC_SUFFIX: &str = "_tc";
pub const MODE_SUFFIX: &str = "_xdpmode";

/// An interface name as a bpffs name: `%` and `.` (VLAN devices like `eth0.100`) escaped.
pub fn escape(iface: &str) -> String {
    iface.replace('%', "%25").replace('.', "%2e")
}

pub fn unescape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let (ch, skip) = match tail.get(..3) {
            Some("%2e") => ('.', 3),
            Some("%25") => ('%', 3),
            _ => ('%', 1),
        };
        out.push(ch);
        rest = &tail[skip..];
    }
    out.push_str(rest);
    out
}

/// The interface a link pin belongs to, and which link it is.
pub fn parse_link_name(name: &str) -> Option<(String, &'static str)> {
    [XDP_SUFFIX, TC_SUFFIX]
        .into_iter()
        .find_map(|sfx| name.strip_suffix(sfx).map(|i| (unescape(i), sfx)))
}

#[derive(Clone, Debug)]
pub struct PinDir {
    pub root: PathBuf,
    /// Held while this process works on the pins (see [`PinDir::lock`]).
    lock: Option<std::sync::Arc<fs::File>>,
}

impl PinDir {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            lock: None,
        }
    }

    /// Hold the pin directory for as long as this value (or a clone) lives: a second agent on
    /// the same pins would race this one's swaps and map writes. An exclusive `flock` on the
    /// directory itself (bpffs takes no regular files), released by the kernel when the
    /// process dies, `kill -9` included. Another holder is an error naming the directory.
    pub fn lock(mut self) -> Result<Self, DataPathError> {
        use std::os::fd::AsRawFd as _;
        let dir = fs::File::open(&self.root)
            .map_err(|e| DataPathError::Other(format!("open {}: {e}", self.root.display())))?;
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(DataPathError::Other(
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    format!(
                        "{} is in use by another wsguard agent on this node: stop it first, or \
                         give this one another --pin-dir",
                        self.root.display()
                    )
                } else {
                    format!("lock {}: {e}", self.root.display())
                },
            ));
        }
        self.lock = Some(std::sync::Arc::new(dir));
        Ok(self)
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join(MAPS)
    }
    pub fn maps_new(&self) -> PathBuf {
        self.root.join(MAPS_NEW)
    }
    pub fn links(&self) -> PathBuf {
        self.root.join(LINKS)
    }
    pub fn xdp_link(&self, iface: &str) -> PathBuf {
        self.links().join(format!("{}{XDP_SUFFIX}", escape(iface)))
    }
    pub fn tc_link(&self, iface: &str) -> PathBuf {
        self.links().join(format!("{}{TC_SUFFIX}", escape(iface)))
    }
    /// Symlink next to the XDP link naming its attach mode (link info does not carry it).
    pub fn xdp_mode(&self, iface: &str) -> PathBuf {
        self.links().join(format!("{}{MODE_SUFFIX}", escape(iface)))
    }

    /// Make sure the pin directory is on bpffs, mounting bpffs on its parent when that is an
    /// empty directory (the state of `/sys/fs/bpf` on a host that never mounted it), and
    /// creating missing directories below a bpffs. A non-empty parent is never mounted over:
    /// that would hide its files. Every directory wsguard creates or owns is 0700.
    pub fn ensure(&self) -> Result<(), DataPathError> {
        let not_bpffs = |detail: String| DataPathError::NotBpffs {
            path: self.root.clone(),
            detail,
        };
        let on_bpffs = |p: &Path| {
            sys::is_bpffs(p).map_err(|e| not_bpffs(format!("statfs {}: {e}", p.display())))
        };
        // The nearest existing directory decides where the pins would land.
        let existing = self
            .root
            .ancestors()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        if !on_bpffs(existing)? {
            if existing == self.root {
                return Err(not_bpffs("it exists but is not on a bpffs mount".into()));
            }
            let parent = self.root.parent().filter(|p| !p.as_os_str().is_empty());
            if parent != Some(existing) {
                return Err(not_bpffs(format!(
                    "{} is not on a bpffs mount",
                    existing.display()
                )));
            }
            let empty = fs::read_dir(existing)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(not_bpffs(format!(
                    "{} is not bpffs and not empty, so bpffs is not mounted over it",
                    existing.display()
                )));
            }
            sys::mount_bpffs(existing)
                .map_err(|e| not_bpffs(format!("mount -t bpf bpf {}: {e}", existing.display())))?;
        }
        let missing: Vec<&Path> = self
            .root
            .ancestors()
            .take_while(|p| *p != existing && !p.as_os_str().is_empty())
            .collect();
        for dir in missing.into_iter().rev() {
            mkdir_0700(dir).map_err(|e| other(format!("create {}: {e}", dir.display())))?;
        }
        for dir in [self.root.clone(), self.maps(), self.links()] {
            mkdir_0700(&dir).map_err(|e| other(format!("create {}: {e}", dir.display())))?;
        }
        Ok(())
    }

    pub fn read_layout(&self) -> Option<Layout> {
        read_record(&self.root.join(LAYOUT)).and_then(|t| Layout::parse(&t))
    }

    pub fn write_layout(&self, layout: &Layout) -> io::Result<()> {
        write_record(&self.root.join(LAYOUT), &layout.to_string())
    }

    /// Whether any map is pinned under `maps/`.
    pub fn has_maps(&self) -> bool {
        fs::read_dir(self.maps())
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    }
}

pub fn mkdir_0700(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        }
        Err(e) => Err(e),
    }
}

/// What the pinned maps and program are: the map layout version and the object's build id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub version: u32,
    pub build: u64,
}

impl Layout {
    fn parse(text: &str) -> Option<Self> {
        let (v, b) = text.strip_prefix("layout-v")?.split_once("-build-")?;
        Some(Self {
            version: v.parse().ok()?,
            build: u64::from_str_radix(b, 16).ok()?,
        })
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "layout-v{}-build-{:016x}", self.version, self.build)
    }
}

pub fn read_record(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()
        .and_then(|t| t.to_str().map(str::to_owned))
}

/// Replace a record atomically: a half-written record must never be read back.
pub fn write_record(path: &Path, text: &str) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!("_tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(text, &tmp)?;
    fs::rename(&tmp, path)
}

pub fn is_record(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// The TC link pin as a record of a clsact filter (kernels without TCX).
pub fn clsact_record(priority: u16, handle: TcHandle) -> String {
    format!("clsact:{priority}:{}", u32::from(handle))
}

pub fn parse_clsact(text: &str) -> Option<(u16, TcHandle)> {
    let (p, h) = text.strip_prefix("clsact:")?.split_once(':')?;
    Some((p.parse().ok()?, TcHandle::from(h.parse::<u32>().ok()?)))
}

fn other(msg: String) -> DataPathError {
    DataPathError::Other(msg)
}

/// The kill switch. Links first, so the programs leave the interfaces while the maps they use
/// still exist; then every pin and the directory. Nothing pinned is success.
pub fn detach_all(root: &Path) -> Result<(), DataPathError> {
    let pins = PinDir::new(root);
    if !root.exists() {
        return Ok(());
    }
    let mut errors = Vec::new();
    if let Ok(entries) = fs::read_dir(pins.links()) {
        for entry in entries.flatten() {
            let path = entry.path();
            if let Err(e) = detach_one(&path) {
                errors.push(format!("{}: {e}", path.display()));
            }
        }
    }
    if !errors.is_empty() {
        // Keep the maps: a link that could not be detached still needs them.
        return Err(other(format!("could not detach: {}", errors.join("; "))));
    }
    fs::remove_dir_all(root).map_err(|e| other(format!("remove {}: {e}", root.display())))
}

fn detach_one(path: &Path) -> Result<(), String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    if is_record(path) {
        let text = read_record(path).unwrap_or_default();
        let link = parse_link_name(&name);
        if let (Some((iface, TC_SUFFIX)), Some((priority, handle))) = (&link, parse_clsact(&text)) {
            if sys::ifindex(iface).is_some() {
                let link = SchedClassifierLink::attached(
                    iface,
                    TcAttachType::Egress,
                    priority,
                    handle,
                    None,
                )
                .map_err(|e| e.to_string())?;
                link.detach()
                    .map_err(|e| format!("remove the clsact filter: {e}"))?;
            } else {
                // Gone with its interface, or the interface lives in another namespace.
                tracing::warn!(
                    iface = %iface,
                    "no such interface here: its clsact filter is not removed if it exists elsewhere"
                );
            }
        } else if let (Some((iface, XDP_SUFFIX)), Some(mode)) = (&link, netlink::record_mode(&text))
        {
            // No link to detach: ask the kernel to remove wsguard's program itself.
            match sys::ifindex(iface) {
                Some(ifindex) => netlink::remove_recorded(iface, ifindex, mode)?,
                None => tracing::warn!(
                    iface = %iface,
                    "no such interface here: its netlink XDP attachment is not removed if it exists elsewhere"
                ),
            }
        }
        return fs::remove_file(path).map_err(|e| e.to_string());
    }
    let fd = sys::obj_get(path).map_err(|e| format!("open the pin: {e}"))?;
    fs::remove_file(path).map_err(|e| format!("unpin: {e}"))?;
    // Unpinning alone leaves the link attached while a running agent holds its fd.
    match sys::link_detach(&fd) {
        Ok(()) => Ok(()),
        // A defunct link (its interface is gone) has nothing left to detach.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOLINK | libc::EINVAL)) => Ok(()),
        Err(e) => Err(format!("BPF_LINK_DETACH: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_have_no_dots_and_round_trip() {
        let pins = PinDir::new(Path::new("/p"));
        for iface in ["eth0", "eth0.100", "a%2eb", "x_xdp"] {
            for path in [pins.xdp_link(iface), pins.tc_link(iface)] {
                let name = path.file_name().unwrap().to_str().unwrap();
                assert!(!name.contains('.'), "{name}");
                assert_eq!(parse_link_name(name).unwrap().0, iface);
            }
        }
        assert_eq!(parse_link_name("eth0_xdpmode"), None);
    }

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let l = Layout {
            version: 3,
            build: 0xdead_beef,
        };
        assert_eq!(Layout::parse(&l.to_string()), Some(l));
        assert!(!l.to_string().contains('.'));
        for bad in [
            "",
            "layout-v",
            "layout-vx-build-1",
            "layout-v1-build-zz",
            "v1-build-1",
        ] {
            assert_eq!(Layout::parse(bad), None, "{bad}");
        }
        let h = TcHandle::from(0x8001_0002u32);
        let rec = clsact_record(49152, h);
        assert_eq!(
            parse_clsact(&rec).map(|(p, h)| (p, u32::from(h))),
            Some((49152, 0x8001_0002))
        );
        assert!(parse_clsact("netlink:native").is_none() && parse_clsact("clsact:x:1").is_none());
        assert_eq!(unescape("a%zz%"), "a%zz%");
    }
}
