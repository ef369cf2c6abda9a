//! The agent's log-line parsers, compiled on their own: `agent/src/logs/parse` depends on
//! nothing else in the agent, so it is included by path instead of depending on the agent
//! crate (whose build script builds the kernel programs).

#[path = "../../src/logs/parse/mod.rs"]
pub mod parse;
