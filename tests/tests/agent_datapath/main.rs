//! The agent's data path against the real kernel: attach, pin, enforce, adopt, upgrade,
//! migrate, detach, survive kill -9 — on veth pairs in namespaces the tests create, with pins
//! on a private bpffs.
//!
//! What the kernel has attached is read from the kernel (`ip -j link`, `BPF_PROG_QUERY`,
//! `tc -j filter`), never from the data path's own report, and traffic runs from the client
//! namespace while the data path is swapped under it.

mod attach;
mod crash;
mod layout;
mod layout2;
mod preserve;
mod proxy;
mod support;
mod table;
mod upgrade;
