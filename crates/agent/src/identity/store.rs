//! The workload's key and chain on persistent disk, so that a restart — or
//! a reboot after the bootstrap token expired — resumes with the
//! certificate it had.
//!
//! Files in the credential directory (created 0700): `key.pem` (0600) and
//! `cert-chain.pem` (0644, leaf first), Istio's names. Each is replaced
//! atomically. The pair is committed in three steps so that a crash at any
//! point leaves a matching pair: the new key goes to `key.pem.next`, then
//! the new chain replaces `cert-chain.pem`, then `key.pem.next` replaces
//! `key.pem`. Loading tries `key.pem`, then `key.pem.next`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use vmesh_ca::SpiffeId;

use super::IdentityError;
use super::credentials::{Credentials, TrustAnchors, split_pem_certificates};
use vmesh_ca::files;

/// The private key (PKCS#8 PEM), mode 0600.
pub const KEY_FILE: &str = "key.pem";
/// The certificate chain (PEM, leaf first), mode 0644.
pub const CHAIN_FILE: &str = "cert-chain.pem";
const NEXT_KEY_FILE: &str = "key.pem.next";

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IdentityError {
    let path = path.to_path_buf();
    move |source| IdentityError::Io {
        action,
        path,
        source,
    }
}

fn read_optional(path: &Path, secret: bool) -> Result<Option<String>, IdentityError> {
    let read = if secret {
        files::read_secret(path)
    } else {
        std::fs::read_to_string(path)
    };
    match read {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("reading", path)(e)),
    }
}

/// The credentials kept in `dir`, if there are any that are valid now,
/// chain to `anchors` and name `expected`. Unusable files are logged and
/// ignored (the agent then starts over with its token); only unreadable
/// ones are errors.
pub(crate) fn load(
    dir: &Path,
    anchors: &TrustAnchors,
    expected: &SpiffeId,
    now: SystemTime,
) -> Result<Option<Credentials>, IdentityError> {
    let chain_path = dir.join(CHAIN_FILE);
    let Some(chain) = read_optional(&chain_path, false)? else {
        return Ok(None);
    };
    let chain = split_pem_certificates(&chain);
    let mut last_error = None;
    for name in [KEY_FILE, NEXT_KEY_FILE] {
        let path = dir.join(name);
        let Some(key) = read_optional(&path, true)? else {
            continue;
        };
        match Credentials::new(&chain, key, anchors, &expected.trust_domain, now) {
            Ok(creds) if creds.identity() == expected => {
                if name == NEXT_KEY_FILE {
                    // The last save stopped before its final rename: finish it.
                    std::fs::rename(&path, dir.join(KEY_FILE))
                        .map_err(io_error("renaming", &path))?;
                } else {
                    let _ = std::fs::remove_file(dir.join(NEXT_KEY_FILE));
                }
                return Ok(Some(creds));
            }
            Ok(creds) => {
                last_error = Some(IdentityError::WrongIdentity {
                    expected: Box::new(expected.clone()),
                    found: Box::new(creds.identity().clone()),
                });
                break;
            }
            Err(IdentityError::KeyMismatch) => last_error = Some(IdentityError::KeyMismatch),
            Err(e) => {
                last_error = Some(e);
                break;
            }
        }
    }
    if let Some(e) = last_error {
        tracing::warn!(dir = %dir.display(), error = %e, "stored workload certificate is not usable; a new one is needed");
    }
    Ok(None)
}

/// Stores `creds` in `dir` (see the module docs for the order).
pub(crate) fn save(dir: &Path, creds: &Credentials) -> Result<(), IdentityError> {
    files::ensure_private_dir(dir).map_err(io_error("creating", dir))?;
    let next: PathBuf = dir.join(NEXT_KEY_FILE);
    files::write_file(&next, creds.key_pem().as_bytes(), files::SECRET_MODE)
        .map_err(io_error("writing", &next))?;
    let chain = dir.join(CHAIN_FILE);
    files::write_file(&chain, creds.chain_pem().as_bytes(), files::PUBLIC_MODE)
        .map_err(io_error("writing", &chain))?;
    let key = dir.join(KEY_FILE);
    std::fs::rename(&next, &key).map_err(io_error("renaming", &next))?;
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::credentials::new_key_and_csr;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;
    use vmesh_ca::{Authority, AuthorityOptions};

    fn issue(ca: &Authority, id: &SpiffeId, anchors: &TrustAnchors) -> Credentials {
        let (key, csr) = new_key_and_csr(id).unwrap();
        let chain = ca
            .sign_workload(&csr, id, Some(Duration::from_secs(3600)))
            .unwrap();
        Credentials::new(
            &chain,
            key.serialize_pem(),
            anchors,
            &id.trust_domain,
            SystemTime::now(),
        )
        .unwrap()
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn saves_private_files_and_loads_them_back_only_when_usable() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Authority::load_or_create(
            &tmp.path().join("ca"),
            "cluster.local",
            AuthorityOptions::default(),
        )
        .unwrap();
        let anchors = TrustAnchors::from_pem(ca.root_pem()).unwrap();
        let id = SpiffeId::new("cluster.local", "vm", "web").unwrap();
        let dir = tmp.path().join("certs");
        let now = SystemTime::now();
        assert!(
            load(&dir, &anchors, &id, now).unwrap().is_none(),
            "nothing yet"
        );

        let creds = issue(&ca, &id, &anchors);
        save(&dir, &creds).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(CHAIN_FILE)), 0o644);
        assert!(!dir.join(NEXT_KEY_FILE).exists());
        assert_eq!(load(&dir, &anchors, &id, now).unwrap(), Some(creds.clone()));

        // Another identity, an expired certificate, another root: ignored.
        let other = SpiffeId::new("cluster.local", "vm", "db").unwrap();
        assert!(load(&dir, &anchors, &other, now).unwrap().is_none());
        let later = creds.not_after() + Duration::from_secs(1);
        assert!(load(&dir, &anchors, &id, later).unwrap().is_none());
        let stranger = Authority::load_or_create(
            &tmp.path().join("other-ca"),
            "cluster.local",
            AuthorityOptions::default(),
        )
        .unwrap();
        let strangers = TrustAnchors::from_pem(stranger.root_pem()).unwrap();
        assert!(load(&dir, &strangers, &id, now).unwrap().is_none());

        // A crash after the new chain but before the key's rename: the
        // pair is still found, and the save is completed.
        let renewed = issue(&ca, &id, &anchors);
        files::write_file(
            &dir.join(NEXT_KEY_FILE),
            renewed.key_pem().as_bytes(),
            files::SECRET_MODE,
        )
        .unwrap();
        files::write_file(
            &dir.join(CHAIN_FILE),
            renewed.chain_pem().as_bytes(),
            files::PUBLIC_MODE,
        )
        .unwrap();
        assert_eq!(
            load(&dir, &anchors, &id, now).unwrap(),
            Some(renewed.clone())
        );
        assert!(!dir.join(NEXT_KEY_FILE).exists());
        assert_eq!(
            std::fs::read_to_string(dir.join(KEY_FILE)).unwrap(),
            renewed.key_pem()
        );
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);

        // A crash right after writing the next key: the old pair stands.
        let third = issue(&ca, &id, &anchors);
        files::write_file(
            &dir.join(NEXT_KEY_FILE),
            third.key_pem().as_bytes(),
            files::SECRET_MODE,
        )
        .unwrap();
        assert_eq!(load(&dir, &anchors, &id, now).unwrap(), Some(renewed));
        assert!(!dir.join(NEXT_KEY_FILE).exists(), "stale next key removed");

        // Garbage is ignored, not an error.
        std::fs::write(dir.join(CHAIN_FILE), "garbage").unwrap();
        assert!(load(&dir, &anchors, &id, now).unwrap().is_none());
    }
}
