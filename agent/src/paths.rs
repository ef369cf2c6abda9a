//! Every default path wsguard uses, in one place (PRODUCT.md, "Files").

/// Pinned maps and links (bpffs, mode 0700).
pub const PIN_DIR: &str = "/sys/fs/bpf/wsguard";
/// The agent's API socket (0600, root).
pub const SOCKET: &str = "/run/wsguard/wsguard.sock";
/// Environment variable that overrides the CLI's socket path.
pub const SOCKET_ENV: &str = "WSGUARD_SOCKET";
/// Bans, allowlist and offence history.
pub const STATE_DIR: &str = "/var/lib/wsguard";
/// File name of the state inside the state directory.
pub const STATE_FILE: &str = "state.json";
/// Present in the state directory while bans are being restored from the state file into
/// fresh maps (after a reboot): a start that finds it finishes the restore instead of taking
/// the half-filled pinned maps as the truth.
pub const RESTORE_MARKER: &str = "restore-pending";
/// File name of the audit log of API mutations inside the state directory.
pub const AUDIT_LOG: &str = "audit.log";
/// Default metrics listen address.
pub const METRICS_ADDR: &str = "0.0.0.0:9477";
