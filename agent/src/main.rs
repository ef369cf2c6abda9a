use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// wsguard — drop WebSocket handshake floods at the NIC, ban bursting sources, keep healthy
/// clients connected.
///
/// `wsguard agent` runs the node daemon; every other verb talks to it over its Unix socket.
/// Exit codes: 0 ok, 1 runtime failure, 2 invalid usage or input, 3 refused by policy.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    global: wsguard::cli::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (the DaemonSet's process); see `wsguard agent --help`.
    #[command(after_help = "Example:\n  wsguard agent --iface eth0 --ports 80,443 --ws-path /ws")]
    Agent {
        // Never parsed here: `main` hands `wsguard agent …` to `AgentCli`, whose --socket is
        // the agent's own flag and would clash with the CLI's global --socket.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
    #[command(flatten)]
    Op(wsguard::cli::Command),
}

/// `wsguard agent [flags]`.
#[derive(Parser)]
#[command(name = "wsguard", version)]
struct AgentCli {
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Run the node agent (the DaemonSet's process).
    Agent(Box<wsguard::config::AgentArgs>),
}

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == "agent") {
        let AgentCommand::Agent(args) = AgentCli::parse().command;
        return match wsguard::daemon::run(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Op(cmd) => wsguard::cli::run(cmd, cli.global),
        Command::Agent { .. } => {
            eprintln!("error: put `agent` first: wsguard agent [flags]");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_lines_are_consistent() {
        super::Cli::command().debug_assert();
        super::AgentCli::command().debug_assert();
    }
}
