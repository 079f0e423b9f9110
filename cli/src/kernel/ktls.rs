//! Hands a finished rustls client session to the kernel's TLS (the `tls`
//! ULP), so the socket given to the NBD driver encrypts and decrypts by
//! itself: no userspace proxy and no copy. The layout of the crypto info
//! is the kernel's `struct tls12_crypto_info_*` (`include/uapi/linux/tls.h`).

use rustls::{ClientConnection, ConnectionTrafficSecrets, ProtocolVersion};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    #[error("the session still holds data the kernel would never see")]
    Unread,
    #[error("the kernel has no TLS support (TCP_ULP \"tls\": {0}); load the tls module")]
    NoUlp(std::io::Error),
    #[error("the kernel refused the {dir} keys: {source}")]
    Keys {
        dir: &'static str,
        source: std::io::Error,
    },
    #[error("{0} cannot be handed to the kernel")]
    Unsupported(String),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// The kernel's crypto info for one direction.
fn crypto_info(
    version: u16,
    seq: u64,
    secrets: &ConnectionTrafficSecrets,
) -> Result<Vec<u8>, KtlsError> {
    let mut b = Vec::with_capacity(56);
    b.extend(version.to_ne_bytes());
    let gcm = |cipher: u16, key: &[u8], iv: &[u8], b: &mut Vec<u8>| {
        // The 12-byte nonce base is a 4-byte salt and an 8-byte iv.
        b.extend(cipher.to_ne_bytes());
        b.extend(&iv[4..12]);
        b.extend(key);
        b.extend(&iv[..4]);
    };
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            gcm(TLS_CIPHER_AES_GCM_128, key.as_ref(), iv.as_ref(), &mut b)
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            gcm(TLS_CIPHER_AES_GCM_256, key.as_ref(), iv.as_ref(), &mut b)
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            b.extend(TLS_CIPHER_CHACHA20_POLY1305.to_ne_bytes());
            b.extend(iv.as_ref());
            b.extend(key.as_ref());
        }
        _ => return Err(KtlsError::Unsupported("this cipher suite".into())),
    }
    b.extend(seq.to_be_bytes());
    Ok(b)
}

fn setsockopt(
    sock: &TcpStream,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> std::io::Result<()> {
    // SAFETY: value is valid for value.len() bytes during the call.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Installs `conn`'s keys on `sock`. The handshake must be over and every
/// byte the server sent read: what rustls holds the kernel cannot see.
pub fn install(sock: &TcpStream, mut conn: ClientConnection) -> Result<(), KtlsError> {
    let state = conn.process_new_packets()?;
    if state.plaintext_bytes_to_read() > 0 || conn.wants_write() || conn.is_handshaking() {
        return Err(KtlsError::Unread);
    }
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_2) => 0x0303,
        Some(ProtocolVersion::TLSv1_3) => 0x0304,
        other => return Err(KtlsError::Unsupported(format!("{other:?}"))),
    };
    setsockopt(sock, libc::SOL_TCP, libc::TCP_ULP, b"tls").map_err(KtlsError::NoUlp)?;
    let secrets = conn.dangerous_extract_secrets()?;
    for (dir, name, (seq, s)) in [
        ("send", TLS_TX, secrets.tx),
        ("receive", TLS_RX, secrets.rx),
    ] {
        let info = crypto_info(version, seq, &s)?;
        setsockopt(sock, libc::SOL_TLS, name, &info)
            .map_err(|source| KtlsError::Keys { dir, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    #[test]
    fn crypto_info_has_the_kernels_layout() {
        let iv: [u8; 12] = std::array::from_fn(|i| i as u8);
        let key = [0xaa; 32];
        let s = ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from(key),
            iv: Iv::from(iv),
        };
        let b = crypto_info(0x0304, 7, &s).unwrap();
        // struct tls12_crypto_info_aes_gcm_256: 2+2+8+32+4+8 bytes.
        assert_eq!(b.len(), 56);
        assert_eq!(
            &b[..4],
            [0x0304u16.to_ne_bytes(), 52u16.to_ne_bytes()].concat()
        );
        assert_eq!(&b[4..12], &iv[4..]);
        assert_eq!(&b[12..44], &key);
        assert_eq!(&b[44..48], &iv[..4]);
        assert_eq!(&b[48..], 7u64.to_be_bytes());
        let s = ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: AeadKey::from([0xbb; 32]),
            iv: Iv::from(iv),
        };
        // struct tls12_crypto_info_chacha20_poly1305: 2+2+12+32+0+8 bytes.
        assert_eq!(crypto_info(0x0304, 0, &s).unwrap().len(), 56);
    }
}
