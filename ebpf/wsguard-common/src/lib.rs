//! Shared between the kernel programs (`wsguard-ebpf`) and userspace (`wsguard`).
//!
//! Everything here is `no_std`, allocation-free and panic-free so the same code runs inside the
//! BPF verifier's limits and in host unit tests and fuzzing.
#![no_std]

pub mod filter;
pub mod http;
pub mod maps;
pub mod proxy;
pub mod rst;
pub mod table;

pub use http::{BadReason, Classification, Classifier, Verdict};
