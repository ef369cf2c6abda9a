use clap::{Parser, Subcommand};

/// wsguard — drop WebSocket handshake floods at the NIC, ban bursting sources, keep healthy
/// clients connected.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (the DaemonSet's process).
    Agent(Box<wsguard::config::AgentArgs>),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Agent(args) => wsguard::daemon::run(*args),
    }
}
