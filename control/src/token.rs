//! The control route's shared secret: a token file readable only by its
//! owner. The runner creates one when it listens beyond loopback; nbd-cli
//! presents it.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
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
    #[error("token file {} is accessible by others (mode {mode:o}); run chmod 600 on it", path.display())]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("token file {} is empty", path.display())]
    Empty { path: PathBuf },
    #[error("getrandom failed: {0}")]
    Random(std::io::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TokenError + '_ {
    move |source| TokenError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads a token, refusing a file others can read.
pub fn read(path: &Path) -> Result<String, TokenError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if meta.mode() & 0o077 != 0 {
        return Err(TokenError::TooOpen {
            path: path.to_owned(),
            mode: meta.mode() & 0o777,
        });
    }
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(token)
}

/// Reads the token at `path`, creating a random one (0600) if missing.
pub fn load_or_create(path: &Path) -> Result<String, TokenError> {
    if path.exists() {
        return read(path);
    }
    let mut bytes = [0u8; 32];
    // SAFETY: getrandom fills at most bytes.len() bytes.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(TokenError::Random(std::io::Error::last_os_error()));
    }
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    writeln!(f, "{token}").map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
    fn world_readable_or_empty_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE_NAME);
        std::fs::write(&p, "secret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read(&p).unwrap_err().to_string().contains("chmod 600"));
        std::fs::write(&p, "\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read(&p).unwrap_err().to_string().contains("empty"));
    }
}
