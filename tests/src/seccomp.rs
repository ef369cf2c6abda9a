//! Making this kernel answer like an older one, for one process tree: a seccomp filter that
//! fails `bpf(BPF_LINK_CREATE, …)` with `EINVAL`, the answer of a kernel before 5.9 (no XDP
//! links) and before 6.6 (no TCX). aya then falls back to a netlink XDP attachment and the agent
//! to a clsact TC filter, exactly as on such a kernel. Installed between fork and exec of a test
//! harness child (`pre_exec`), so the agent binary under test is the real one; the filter is
//! inherited across exec (nsenter, then wsguard) and by every child.

use std::{io, os::unix::process::CommandExt as _, process::Command};

/// `bpf(2)` command number of `BPF_LINK_CREATE` (include/uapi/linux/bpf.h).
pub const BPF_LINK_CREATE: u32 = 28;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// Offsets into `struct seccomp_data`: nr, arch, then args[0] (its low 32 bits on a
/// little-endian machine; `cmd` is an int, so the kernel reads only those).
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
#[cfg(target_endian = "little")]
const OFF_ARG0: u32 = 16;

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

/// The classic-BPF program: `bpf(cmd, …)` with `cmd == bpf_cmd` fails with `errno`; every
/// other system call (and any other architecture's) is allowed.
pub fn deny_bpf_cmd_program(bpf_cmd: u32, errno: i32) -> Vec<libc::sock_filter> {
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    vec![
        stmt(load, OFF_ARCH),
        jeq(AUDIT_ARCH, 0, 4),
        stmt(load, OFF_NR),
        jeq(libc::SYS_bpf as u32, 0, 2),
        stmt(load, OFF_ARG0),
        jeq(bpf_cmd, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(ret, libc::SECCOMP_RET_ERRNO | (errno as u32 & 0xffff)),
    ]
}

/// Install `prog` in the calling thread (no_new_privs first: required without CAP_SYS_ADMIN in
/// the user namespace, and harmless for root). Only async-signal-safe calls: runs after fork.
fn install(prog: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fprog` points at `prog`, alive for the call; the kernel copies the program.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Make `cmd`'s process (and everything it execs or forks) see `bpf(BPF_LINK_CREATE)` fail
/// with `EINVAL`, as on a kernel without BPF links.
pub fn without_bpf_links(cmd: &mut Command) {
    let prog = deny_bpf_cmd_program(BPF_LINK_CREATE, libc::EINVAL);
    // SAFETY: the hook only calls prctl(2) and seccomp(2) on a program built before the fork.
    unsafe {
        cmd.pre_exec(move || install(&prog));
    }
}
