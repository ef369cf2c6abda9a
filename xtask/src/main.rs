//! `cargo xtask`: everything a fresh machine needs to build and test wsguard, in one place.

mod bench;
mod bootstrap;
mod bootstrap_py;
mod cmd;
mod demo;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    about = "wsguard developer tasks (run as root on a fresh machine: it installs what is missing)"
)]
struct Cli {
    #[command(subcommand)]
    task: Option<Task>,
}

#[derive(Subcommand)]
enum Task {
    /// Check the eBPF build prerequisites and install only what is missing (the default task).
    Bootstrap,
    /// The whole test suite: bootstrap, format, lints, unit, kernel and integration tests.
    Test,
    /// Bootstrap, build, and run the lab demo: an attack banned while real clients stay up.
    Demo,
    /// Data-plane benchmark: wsguard next to a reference program and xdp-filter, in one run (root).
    Bench,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task.unwrap_or(Task::Bootstrap) {
        Task::Bootstrap => bootstrap::run().map(drop),
        Task::Test => test::run(),
        Task::Demo => demo::run_demo(),
        Task::Bench => bench::run(),
    }
}
