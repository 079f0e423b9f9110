//! TLS credentials, in nbdkit's and qemu's directory layout so operators
//! reuse what they have: a server directory holds `ca-cert.pem`,
//! `server-cert.pem` and `server-key.pem`; a client directory holds
//! `ca-cert.pem` and, for client-certificate authentication,
//! `client-cert.pem` and `client-key.pem`. Private keys must be the
//! reader's own (or root's) and readable by no one else.
//!
//! rustls with the ring provider: no PSK (rustls has no external PSKs), but
//! a sans-IO core the engine drives from its own sockets, and session
//! secrets `nbd-cli map` can hand to the kernel's TLS.

use crate::trust::{self, Privacy, TrustError};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{}: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Untrusted(#[from] TrustError),
    #[error("{}: {what}", path.display())]
    Pem { path: PathBuf, what: String },
    #[error("TLS credentials in {}: {cause}", dir.display())]
    Rustls { dir: PathBuf, cause: rustls::Error },
    #[error("cannot verify peers with {}: {what}", path.display())]
    Verifier { path: PathBuf, what: String },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |what: String| TlsError::Pem {
        path: path.to_owned(),
        what,
    };
    let data = std::fs::read(path).map_err(|cause| TlsError::Read {
        path: path.to_owned(),
        cause,
    })?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(pem("holds no certificate".into()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let mut f = trust::open(
        path,
        std::fs::OpenOptions::new().read(true),
        &[trust::euid(), 0],
        Privacy::Secret,
    )?;
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(|cause| TlsError::Read {
        path: path.to_owned(),
        cause,
    })?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        what: format!("not a PEM private key ({e})"),
    })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c).map_err(|e| TlsError::Verifier {
            path: path.to_owned(),
            what: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The runner's credentials from `dir`. With `verify_peer`, clients must
/// present a certificate signed by `ca-cert.pem`: that is the
/// authentication (nbdkit's `--tls-verify-peer`).
pub fn server_config(dir: &Path, verify_peer: bool) -> Result<Arc<ServerConfig>, TlsError> {
    let rustls_err = |cause| TlsError::Rustls {
        dir: dir.to_owned(),
        cause,
    };
    let chain = certs(&dir.join("server-cert.pem"))?;
    let key = key(&dir.join("server-key.pem"))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_err)?;
    let builder = if verify_peer {
        let ca = dir.join("ca-cert.pem");
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&ca)?), provider())
                .build()
                .map_err(|e| TlsError::Verifier {
                    path: ca,
                    what: e.to_string(),
                })?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(chain, key).map_err(rustls_err)?;
    // No resumption: after the handshake a kernel-TLS client must see
    // nothing but application data.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// A client's credentials from `dir`: the CA that signed the server, and
/// the client's own certificate when `client-cert.pem` is there.
pub fn client_config(dir: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let rustls_err = |cause| TlsError::Rustls {
        dir: dir.to_owned(),
        cause,
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_err)?
        .with_root_certificates(roots(&dir.join("ca-cert.pem"))?);
    let cert = dir.join("client-cert.pem");
    let mut config = if cert.exists() {
        builder
            .with_client_auth_cert(certs(&cert)?, key(&dir.join("client-key.pem"))?)
            .map_err(rustls_err)?
    } else {
        builder.with_no_client_auth()
    };
    // `nbd-cli map` hands the session to the kernel.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn missing_and_malformed_credentials_are_one_line_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = server_config(dir.path(), false).unwrap_err().to_string();
        assert!(e.contains("server-cert.pem") && !e.contains('\n'), "{e}");
        std::fs::write(dir.path().join("server-cert.pem"), "not pem").unwrap();
        let e = server_config(dir.path(), false).unwrap_err().to_string();
        assert!(e.contains("holds no certificate"), "{e}");
    }

    #[test]
    fn a_private_key_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("client-key.pem");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = super::key(&key).unwrap_err().to_string();
        assert!(e.contains("readable by others"), "{e}");
    }
}
