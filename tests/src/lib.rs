//! Shared pieces of wsguard's integration tests and benchmarks: crafted packets, a harness that
//! runs the real kernel programs through BPF_PROG_TEST_RUN, and (later) the network lab.

pub mod agent;
pub mod cgroup;
pub mod crowdsec;
pub mod dataplane;
pub mod lab;
pub mod netns;
pub mod packet;
pub mod seccomp;
