//! Support for the `classify` fuzz target: the reference classifier it compares against.

pub mod reference;
