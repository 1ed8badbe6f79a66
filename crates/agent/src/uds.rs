//! Unix domain sockets for Envoy (SDS and the xDS proxy): bound under a
//! temporary name, given their mode, then renamed into place, so the socket
//! never appears at its path with looser permissions than asked; served with
//! tonic until shutdown; removed afterwards.
//!
//! Who owns the socket (when Envoy runs as another user) is the caller's
//! business; this module only sets the mode. What is served on it is the
//! caller's too ([`crate::sds`], [`crate::xds_proxy`]).

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;

/// A bound socket, to be served once. Its file is removed once it has been
/// served, or when it is dropped unserved.
#[derive(Debug)]
pub(crate) struct Socket {
    listener: UnixListener,
    file: RemoveOnDrop,
}

#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        remove(&self.0);
    }
}

impl Socket {
    /// Binds `path` with file mode `mode` (see [`bind`]).
    pub(crate) fn bind(path: &Path, mode: u32) -> io::Result<Socket> {
        Ok(Socket {
            listener: bind(path, mode)?,
            file: RemoveOnDrop(path.to_path_buf()),
        })
    }

    /// Serves `routes` (tonic services) until `shutdown` turns true, then
    /// removes the socket file.
    pub(crate) async fn serve(
        self,
        routes: Routes,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), tonic::transport::Error> {
        let Socket { listener, file } = self;
        let served = tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                crate::stopped(&mut shutdown).await;
            })
            .await;
        drop(file);
        served
    }
}

/// Binds `path` with file mode `mode`. A stale socket left at `path` by an
/// earlier run is replaced; any other kind of file there is an error. The
/// parent directory is created (0755) when missing.
fn bind(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)?;
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "socket path has no file name")
    })?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}", std::process::id()));
    let tmp: PathBuf = parent.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Removes the socket at `path` if it is one (on shutdown).
fn remove(path: &Path) {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sockets_get_their_mode_replace_stale_ones_and_spare_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/sds.sock");
        let listener = bind(&path, 0o600).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Connecting by the final path reaches the listener.
        let (client, accepted) =
            tokio::join!(tokio::net::UnixStream::connect(&path), listener.accept());
        client.unwrap();
        accepted.unwrap();
        drop(listener);

        // A stale socket is replaced; the group mode is honoured.
        let again = bind(&path, 0o660).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o660
        );
        drop(again);
        remove(&path);
        assert!(!path.exists());

        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, "data").unwrap();
        assert!(bind(&file, 0o600).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
        remove(&file);
        assert!(file.exists(), "only sockets are removed");
    }

    #[tokio::test]
    async fn a_socket_is_served_until_shutdown_then_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/health.sock");
        let (health, service) = tonic_health::server::health_reporter();
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let (stop, shutdown) = watch::channel(false);
        let socket = Socket::bind(&path, 0o600).unwrap();
        let served = tokio::spawn(socket.serve(Routes::new(service), shutdown));
        tokio::net::UnixStream::connect(&path).await.unwrap();
        stop.send_replace(true);
        served.await.unwrap().unwrap();
        assert!(!path.exists(), "removed after serving");

        // Bound but never served: removed all the same.
        drop(Socket::bind(&path, 0o600).unwrap());
        assert!(!path.exists(), "removed when dropped");
    }
}
