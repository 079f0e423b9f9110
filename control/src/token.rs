//! The control route's shared secret: a token file readable only by its
//! owner. The runner creates one in its state directory (or uses the file
//! the operator names) and requires it from every TCP caller; nbd-cli
//! presents it.

use crate::trust::{self, Privacy, TrustError};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const FILE_NAME: &str = "token";

#[derive(Debug, Error)]
pub enum TokenError {
    #[error("token file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token file: {0}")]
    Untrusted(#[from] TrustError),
    #[error("token file {} is empty", path.display())]
    Empty { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TokenError + '_ {
    move |source| TokenError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads a token as nbd-cli does: the file must be this user's or root's,
/// readable by no one else, and not a symlink.
pub fn read(path: &Path) -> Result<String, TokenError> {
    read_owned(path, &[trust::euid(), 0])
}

fn read_owned(path: &Path, owners: &[u32]) -> Result<String, TokenError> {
    let mut f = trust::open(path, OpenOptions::new().read(true), owners, Privacy::Secret)?;
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(io(path))?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(token)
}

/// The runner's token at `path`, created random (0600) if missing; an
/// existing file must be the runner's user's own.
pub fn load_or_create(path: &Path) -> Result<String, TokenError> {
    match read_owned(path, &[trust::euid()]) {
        Err(TokenError::Untrusted(e)) if e.not_found() => {}
        other => return other,
    }
    let token = trust::random_hex(32);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io(path))?;
    writeln!(f, "{token}").map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn created_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE_NAME);
        let t = load_or_create(&p).unwrap();
        assert_eq!(t.len(), 64);
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(load_or_create(&p).unwrap(), t);
        assert_eq!(read(&p).unwrap(), t);
    }

    #[test]
    fn world_readable_empty_or_linked_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE_NAME);
        std::fs::write(&p, "secret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read(&p).unwrap_err().to_string().contains("chmod 600"));
        assert!(load_or_create(&p)
            .unwrap_err()
            .to_string()
            .contains("chmod 600"));
        std::fs::write(&p, "\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read(&p).unwrap_err().to_string().contains("empty"));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(load_or_create(&link)
            .unwrap_err()
            .to_string()
            .contains("symbolic link"));
    }
}
