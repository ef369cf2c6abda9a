//! Terminal facts: whether stdout/stderr are terminals, and colour only when they are (and
//! `NO_COLOR` is unset), so pipes and files never get escape codes.

pub const RED: &str = "31";
pub const YELLOW: &str = "33";
pub const GREEN: &str = "32";

pub fn stdout_is_tty() -> bool {
    is_tty(libc::STDOUT_FILENO)
}

pub fn stderr_is_tty() -> bool {
    is_tty(libc::STDERR_FILENO)
}

pub fn stdin_is_tty() -> bool {
    is_tty(libc::STDIN_FILENO)
}

fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor number; any value is safe to pass.
    unsafe { libc::isatty(fd) == 1 }
}

fn colour_ok() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn paint(text: &str, code: &str, tty: bool) -> String {
    if tty && colour_ok() {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

pub fn paint_stdout(text: &str, code: &str) -> String {
    paint(text, code, stdout_is_tty())
}

pub fn paint_stderr(text: &str, code: &str) -> String {
    paint(text, code, stderr_is_tty())
}

/// Redraw `frame` every second until Ctrl-C (SIGINT ends the process). On a terminal the
/// screen is cleared between frames; into a pipe, frames follow each other.
pub fn watch(mut frame: impl FnMut(&mut Vec<u8>) -> super::Result<()>) -> super::Result<()> {
    use std::io::Write;
    let tty = stdout_is_tty();
    loop {
        let mut buf = Vec::new();
        if tty {
            buf.extend_from_slice(b"\x1b[H\x1b[2J");
        }
        frame(&mut buf)?;
        let mut out = std::io::stdout().lock();
        out.write_all(&buf)?;
        out.flush()?;
        drop(out);
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
