//! Binding the API socket without ever stealing it from a live agent.

use std::{
    fs::{self, DirBuilder},
    os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    path::Path,
};

use anyhow::{Context, bail};
use tokio::net::UnixListener;

pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("cannot create the socket directory {}", dir.display()))?;
    }
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket: remove it or pass another --socket",
                path.display()
            );
        }
        // A socket file survives a crash; only a live listener makes it ours to keep.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another process is already serving on {} (another wsguard agent?)",
                path.display()
            );
        }
        fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let std_listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("cannot bind the API socket {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod 0600 {}", path.display()))?;
    std_listener.set_nonblocking(true)?;
    Ok(UnixListener::from_std(std_listener)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replaces_stale_refuses_live_and_non_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/wsguard.sock");
        let live = bind(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = bind(&path).unwrap_err().to_string();
        assert!(e.contains("already serving"), "{e}");
        drop(live);
        // The file stays behind after the listener closes: stale, so it is replaced.
        assert!(path.exists());
        bind(&path).unwrap();
        let plain = dir.path().join("plain");
        fs::write(&plain, "x").unwrap();
        assert!(
            bind(&plain)
                .unwrap_err()
                .to_string()
                .contains("not a socket")
        );
    }
}
