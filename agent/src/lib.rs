//! wsguard: the agent that runs on every node, and the operator CLI, in one binary.

pub mod addr;
pub mod api;
pub mod bpf;
pub mod cli;
pub mod config;
pub mod crowdsec;
pub mod daemon;
pub mod datapath;
pub mod duration;
pub mod logs;
pub mod metrics;
pub mod model;
pub mod paths;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod state;
