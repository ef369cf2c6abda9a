//! Every program the bench compares, run the same way: one BPF_PROG_TEST_RUN call by program
//! fd, wsguard's own programs and xdp-filter's alike.

use anyhow::{Result, bail};
use aya::programs::ProgramFd;
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::atomic::{AtomicBool, Ordering},
};
use wsguard_tests::dataplane::XDP_DROP;

/// The programs a case can run, besides its floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Prog {
    /// `XDP_PASS` and nothing else: what test_run itself costs for a passed packet.
    FloorPass,
    /// `XDP_DROP` and nothing else.
    FloorDrop,
    /// Parse Ethernet + IP, one hash lookup of the source, drop on a hit (`wsguard_bench_ref`).
    Reference,
    /// The same lookup behind wsguard's own parser (`wsguard_bench_parsed`).
    ReferenceParsed,
    /// `wsguard_xdp`, the real program (the held verdict for a hot banned source).
    Wsguard,
    /// `wsguard_bench_lookup`: the real drop path without the held verdict.
    WsguardLookup,
    /// The split of the lookup path: wsguard's parser and the table probe
    /// (`wsguard_bench_probe`), then what the path does before judging (`_screened`), then the
    /// judgement without the drop accounting (`_judged`).
    Probe,
    Screened,
    Judged,
    /// xdp-filter's program, as its CLI loaded it.
    XdpFilter,
}

impl Prog {
    pub fn floor(verdict: u32) -> Self {
        if verdict == XDP_DROP {
            Self::FloorDrop
        } else {
            Self::FloorPass
        }
    }

    /// The name the tables give it on a case of `verdict`.
    pub fn label(self, verdict: u32) -> &'static str {
        match self {
            Self::FloorPass | Self::FloorDrop => "floor",
            Self::Reference => "reference",
            Self::ReferenceParsed => "reference behind wsguard's parser",
            Self::Wsguard if verdict == XDP_DROP => "wsguard, held verdict",
            Self::Wsguard => "wsguard",
            Self::WsguardLookup if verdict == XDP_DROP => "wsguard, lookup",
            Self::Probe => "(1) wsguard's parser + the BAN_TABLE_V4 probe",
            Self::Screened => "(2) = (1) + settings, counter slots, pre-filter, host filter",
            Self::Judged => {
                "(3) = (2) + the judgement: expiry, allowlist flag, observe mode, preserved flows"
            }
            Self::WsguardLookup => "wsguard up to its ban verdict (wsguard_bench_lookup)",
            Self::XdpFilter => "xdp-filter",
        }
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Turn SIGINT/SIGTERM/SIGHUP into an error at the next check, so the bench unwinds and its
/// guards remove the namespace (and with it xdp-filter) instead of leaving them behind.
pub fn stop_on_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn check_stop() -> Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// One BPF_PROG_TEST_RUN call.
pub struct Run {
    pub action: u32,
    /// This thread's CPU time for the call, per run: sub-ns resolution where the kernel's own
    /// duration is whole ns, and like the kernel's it leaves out time the thread was preempted.
    /// Over a million runs per call, the syscall's fixed cost is a few picoseconds of it.
    pub cpu_ns: f64,
    /// The kernel's duration, whole ns per run (the handshake rows: one run per call, where the
    /// syscall's fixed cost would dominate the CPU time).
    pub kernel_ns: u32,
}

/// The part of `union bpf_attr` that BPF_PROG_TEST_RUN reads (uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Run `prog` `repeat` times on `frame`.
pub fn test_run(prog: &ProgramFd, frame: &[u8], repeat: u32) -> Result<Run> {
    check_stop()?;
    let mut attr = TestRunAttr {
        prog_fd: prog.as_fd().as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    let before = thread_cpu_ns();
    // SAFETY: `attr` is a valid, fully initialised bpf_attr prefix; `frame` outlives the call;
    // no output buffer is given, so the kernel writes only into `attr`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            size_of::<TestRunAttr>(),
        )
    };
    let after = thread_cpu_ns();
    if rc != 0 {
        bail!("BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
    }
    Ok(Run {
        action: attr.retval,
        cpu_ns: (after - before) as f64 / f64::from(repeat.max(1)),
        kernel_ns: attr.duration,
    })
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The CPU this thread runs on, to pin it there: consecutive calls then share the programs'
/// per-CPU state (the held verdict of a hot banned source).
pub fn current_cpu() -> usize {
    // SAFETY: no arguments; returns -1 only where unsupported.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).unwrap_or(0)
}
