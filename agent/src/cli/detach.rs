//! `wsguard detach`: the kill switch.

use std::{
    io::{BufRead, ErrorKind, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use clap::Args;

use super::{CliError, Client, Global, Output, Result, term};
use crate::{datapath::DataPath, paths};

#[derive(Debug, Args)]
pub struct DetachArgs {
    /// Do not ask for confirmation on a terminal.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// The agent's pin directory, used only when the agent is not running (crashed or
    /// stopped): then the pins are removed here directly.
    #[arg(long, value_name = "DIR", default_value = paths::PIN_DIR)]
    pub pin_dir: PathBuf,
}

pub fn run(a: DetachArgs, g: &Global) -> Result<()> {
    // On a terminal a stray `detach` from shell history must not drop the node's protection.
    if !a.yes && term::stdin_is_tty() {
        eprint!(
            "This removes wsguard's programs, links and pins from every interface and stops the \
             agent: nothing will be filtered. Continue? [y/N] "
        );
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(|e| CliError::runtime(format!("cannot read the answer: {e}")))?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(CliError::runtime("not detached"));
        }
    }
    // Fail-static leaves programs enforcing after the agent died: the kill switch must work
    // then too, and then nothing holds the links but their pins.
    let down = matches!(
        UnixStream::connect(&g.socket).map_err(|e| e.kind()),
        Err(ErrorKind::NotFound | ErrorKind::ConnectionRefused)
    );
    if down {
        return detach_locally(&a.pin_dir, g);
    }
    let _: serde_json::Value = Client::new(&g.socket).post("/v1/detach", &serde_json::json!({}))?;
    let mut out = std::io::stdout().lock();
    if g.output == Output::Json {
        return Ok(super::output::json(
            &mut out,
            &serde_json::json!({"detached": true}),
        )?);
    }
    writeln!(
        out,
        "detached: programs, links and pins removed; the agent is exiting. Nothing is filtered \
         until `wsguard agent` starts again."
    )?;
    Ok(())
}

fn detach_locally(pin_dir: &Path, g: &Global) -> Result<()> {
    match std::fs::symlink_metadata(pin_dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(CliError::runtime(format!(
                "the agent is not running ({} does not answer) and there are no pins at {}: \
                 nothing to detach (pass --pin-dir if the agent used another directory)",
                g.socket.display(),
                pin_dir.display()
            )));
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            return Err(CliError::runtime(format!(
                "permission denied on {}: run as root",
                pin_dir.display()
            )));
        }
        _ => {}
    }
    DataPath::detach_all(pin_dir).map_err(|e| {
        CliError::runtime(format!(
            "cannot detach using the pins at {}: {e} (run as root, in the node's network \
             namespace)",
            pin_dir.display()
        ))
    })?;
    let mut out = std::io::stdout().lock();
    if g.output == Output::Json {
        let v = serde_json::json!({"detached": true, "agent_running": false});
        return Ok(super::output::json(&mut out, &v)?);
    }
    writeln!(
        out,
        "the agent is not running: detached using the pins at {}; programs, links and pins \
         removed",
        pin_dir.display()
    )?;
    Ok(())
}
