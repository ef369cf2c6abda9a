//! The few kernel calls aya 0.14 does not expose: bpffs detection and mounting, a link's
//! target interface, forced link detach, and batched map reads and writes.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// The kernel-internal "operation not supported" that map commands return (not in libc).
const ENOTSUPP: i32 = 524;

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Whether `path` (which must exist) lives on a bpffs.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = cstr(path)?;
    // SAFETY: all-zero is a valid statfs; the kernel fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between libc targets"
    )]
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// `mount -t bpf bpf <path>` with mode 0700.
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = cstr(path)?;
    let (src, fstype, data) = (c"bpf", c"bpf", c"mode=0700");
    // SAFETY: valid C strings; bpffs takes a text option string.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a `#[repr(C)]` attribute struct of the layout the kernel expects for
    // `cmd`, zero where unused.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The parts of `struct bpf_link_info` wsguard reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// XDP and TCX links: the interface; 0 once the interface is gone (a defunct link).
    pub ifindex: u32,
}

pub const LINK_TYPE_XDP: u32 = 6;
pub const LINK_TYPE_TCX: u32 = 11;

/// `struct bpf_link_info` head: the union after `prog_id` is 8-aligned, and its `xdp` and
/// `tcx` members both start with the ifindex. The tail stays zero, as the kernel requires.
#[repr(C)]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    ifindex: u32,
    _rest: [u32; 27],
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

pub fn link_info(fd: &impl AsRawFd) -> io::Result<LinkInfo> {
    // SAFETY: plain integers; all-zero is valid.
    let mut raw: RawLinkInfo = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<RawLinkInfo>() as u32,
        info: &mut raw as *mut RawLinkInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(LinkInfo {
        link_type: raw.link_type,
        id: raw.id,
        prog_id: raw.prog_id,
        ifindex: raw.ifindex,
    })
}

/// Detach a link now, whoever else still holds it open (a running agent does).
pub fn link_detach(fd: &impl AsRawFd) -> io::Result<()> {
    #[repr(C)]
    struct DetachAttr {
        link_fd: u32,
    }
    bpf(
        BPF_LINK_DETACH,
        &mut DetachAttr {
            link_fd: fd.as_raw_fd() as u32,
        },
    )
}

/// The ids of the maps a loaded program uses (`bpf_prog_info.map_ids`).
pub fn prog_map_ids(prog_id: u32) -> io::Result<Vec<u32>> {
    #[repr(C)]
    struct GetFdAttr {
        prog_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    /// `struct bpf_prog_info` up to `map_ids`; the kernel fills what fits.
    #[repr(C)]
    struct RawProgInfo {
        /// type, id, tag, jited_prog_len, xlated_prog_len.
        _head: [u32; 6],
        /// jited_prog_insns, xlated_prog_insns, load_time.
        _ptrs: [u64; 3],
        _created_by_uid: u32,
        nr_map_ids: u32,
        map_ids: u64,
    }
    let mut get = GetFdAttr {
        prog_id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: a valid BPF_PROG_GET_FD_BY_ID attribute.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_FD_BY_ID,
            &mut get as *mut GetFdAttr,
            size_of::<GetFdAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(rc as i32) };
    // A program of this object uses well under 64 maps; the kernel reports the real count.
    let mut ids = [0u32; 64];
    // SAFETY: plain integers; all-zero is valid.
    let mut raw: RawProgInfo = unsafe { std::mem::zeroed() };
    raw.nr_map_ids = ids.len() as u32;
    raw.map_ids = ids.as_mut_ptr() as u64;
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<RawProgInfo>() as u32,
        info: &mut raw as *mut RawProgInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(ids[..(raw.nr_map_ids as usize).min(ids.len())].to_vec())
}

/// `BPF_OBJ_GET`: open a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct GetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = cstr(path)?;
    let mut attr = GetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: a valid BPF_OBJ_GET attribute; the pathname outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut attr as *mut GetAttr,
            size_of::<GetAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

/// `union bpf_attr`'s `batch` member (BPF_MAP_*_BATCH).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A batch call that failed after `done` entries went through.
#[derive(Debug)]
pub struct BatchError {
    pub done: usize,
    pub err: io::Error,
}

/// `BPF_MAP_UPDATE_BATCH`: `keys[i] -> values[i]`, in order, in one syscall (create or
/// replace: the kernel takes no `BPF_NOEXIST` here). Hash maps only; LPM tries answer EINVAL.
/// On an error, the entries before `done` are written and the rest are not.
pub fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let count = u32::try_from(keys.len()).expect("batches are far below 4G entries");
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
        Ok(()) => Ok(()),
        // The kernel writes back how many it processed.
        Err(err) => Err(BatchError {
            done: (attr.count as usize).min(keys.len()),
            err,
        }),
    }
}

/// Whether a batch call failed only because the kernel has no batch operations (before 5.6).
pub fn batch_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP))
}

/// `BPF_MAP_UPDATE_ELEM` of one entry (create or replace), the fallback of `update_batch`.
pub fn update_elem<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
    value: &V,
) -> io::Result<()> {
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    bpf(
        BPF_MAP_UPDATE_ELEM,
        &mut ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: key as *const K as u64,
            value: value as *const V as u64,
            flags: 0,
        },
    )
}

/// Every entry of a hash map through `BPF_MAP_LOOKUP_BATCH`, `chunk` entries per syscall, at
/// most `limit` in all. `Ok(None)` if the kernel has no batch lookup for this map (then walk
/// it key by key).
pub fn lookup_all<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    chunk: usize,
    limit: usize,
) -> io::Result<Option<Vec<(K, V)>>> {
    let mut out = Vec::new();
    let r = lookup_chunks(map, chunk, limit, &mut |c: &[(K, V)]| {
        out.extend_from_slice(c);
        Ok(())
    })?;
    Ok(r.then_some(out))
}

/// What [`lookup_chunks`] hands each syscall's entries to.
pub type Chunks<'a, K, V> = dyn FnMut(&[(K, V)]) -> io::Result<()> + 'a;

/// Like [`lookup_all`], handing each syscall's entries to `f` instead of collecting them (a
/// walk of a million entries holds one chunk). `Ok(false)` if the kernel has no batch lookup
/// for this map and nothing was handed out.
pub fn lookup_chunks<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    chunk: usize,
    limit: usize,
    f: &mut Chunks<'_, K, V>,
) -> io::Result<bool> {
    let mut chunk = chunk.max(1);
    let mut seen = 0usize;
    // The hash map's position token is a bucket index (u32); 8 bytes covers every map type.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    let mut out: Vec<(K, V)> = Vec::new();
    loop {
        let mut keys: Vec<std::mem::MaybeUninit<K>> = Vec::with_capacity(chunk);
        let mut values: Vec<std::mem::MaybeUninit<V>> = Vec::with_capacity(chunk);
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &mut token_in as *mut u64 as u64
            },
            out_batch: &mut token_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let end = match &r {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // One bucket holds more entries than fit: retry the same position with more room.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && chunk < 1 << 20 => {
                chunk *= 2;
                continue;
            }
            Err(e) if first && batch_unsupported(e) => {
                return Ok(false);
            }
            Err(_) => return r.map(|()| false),
        };
        let n = (attr.count as usize).min(chunk).min(limit - seen);
        // SAFETY: the kernel filled the first `attr.count` keys and values (`count` says how
        // many, and `n` is no more); K and V are Pod, so any bytes are valid values.
        unsafe {
            keys.set_len(n);
            values.set_len(n);
        }
        out.clear();
        out.extend(
            keys.into_iter()
                .zip(values)
                // SAFETY: initialised above.
                .map(|(k, v)| unsafe { (k.assume_init(), v.assume_init()) }),
        );
        f(&out)?;
        seen += n;
        if end || seen >= limit {
            return Ok(true);
        }
        token_in = token_out;
        first = false;
    }
}

pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}
