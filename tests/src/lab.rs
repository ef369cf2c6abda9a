//! The lab's shared pieces: HTTP helpers and the JSON summaries its peers print.

pub mod http;
pub mod summary;
