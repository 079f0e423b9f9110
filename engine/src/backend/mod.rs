//! Backends: one trait with capability methods, in the shape of nbdkit's
//! `can_*` calls and cloud-hypervisor's `DiskFile`/`AsyncIo` split.
//!
//! [`Backend`] is the shared, thread-safe description of a backstore: size and
//! capabilities, from which the NBD transmission flags and block sizes derive.
//! [`Backend::attach`] opens a per-shard [`BackendIo`] inside that shard's
//! executor, so io_uring rings and file descriptors stay shard-local.

pub mod aligned;
#[cfg(feature = "ceph")]
pub mod ceph;
pub mod completion;
pub mod file;
#[cfg(feature = "gluster")]
pub mod gluster;
pub mod lone;
pub mod mapped;
pub mod mem;
pub mod pipe;

use crate::protocol::consts::*;
use crate::protocol::{Errno, Extent, MAX_PAYLOAD};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use thiserror::Error;

pub use file::FileBackend;
pub use mem::{MemBackend, MemBudget};

/// Reports a long operation's progress: (bytes done, bytes in all).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// A shard-local future; backends complete on the shard that issued the IO.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + 'a>>;

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("operation not supported by this backend")]
    Unsupported,
    #[error("{0}")]
    Config(String),
}

impl BackendError {
    pub fn io(context: &'static str, source: std::io::Error) -> Self {
        BackendError::Io { context, source }
    }

    /// The NBD error the client sees; backend errors always reach the client
    /// (nbdcopy CVE-2022-0485 was a swallowed one).
    pub fn errno(&self) -> Errno {
        match self {
            BackendError::Io { source, .. } => Errno::from_io(source),
            BackendError::Unsupported => Errno::NotSup,
            BackendError::Config(_) => Errno::Io,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes {
            min: 1,
            preferred: 4096,
            max: MAX_PAYLOAD,
        }
    }
}

/// What a backend can do. The engine advertises exactly this, nothing more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub read_only: bool,
    pub flush: bool,
    pub fua: bool,
    pub trim: bool,
    pub zero: bool,
    pub fast_zero: bool,
    pub cache: bool,
    pub block_status: bool,
    /// Writes acknowledged on any connection are covered by a flush on any
    /// other (docs/ARCHITECTURE.md, "Durability").
    pub multi_conn: bool,
    pub rotational: bool,
    pub block: BlockSizes,
}

impl Capabilities {
    /// Every command supported, default block sizes: what a backend starts
    /// from before it turns off what it cannot do.
    pub fn all(read_only: bool) -> Self {
        Capabilities {
            read_only,
            flush: true,
            fua: true,
            trim: true,
            zero: true,
            fast_zero: true,
            cache: true,
            block_status: true,
            multi_conn: true,
            rotational: false,
            block: BlockSizes::default(),
        }
    }

    /// NBD transmission flags for these capabilities.
    pub fn transmission_flags(&self) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_DF;
        let mut set = |cond: bool, bit: u16| {
            if cond {
                f |= bit;
            }
        };
        set(self.read_only, TF_READ_ONLY);
        set(self.flush, TF_SEND_FLUSH);
        set(self.fua, TF_SEND_FUA);
        set(self.rotational, TF_ROTATIONAL);
        set(self.trim && !self.read_only, TF_SEND_TRIM);
        set(self.zero && !self.read_only, TF_SEND_WRITE_ZEROES);
        set(self.multi_conn, TF_CAN_MULTI_CONN);
        set(self.cache, TF_SEND_CACHE);
        set(
            self.fast_zero && self.zero && !self.read_only,
            TF_SEND_FAST_ZERO,
        );
        f
    }
}

/// Flags for WRITE_ZEROES.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    pub fua: bool,
    /// The client wants allocated zeroes, not a hole.
    pub no_hole: bool,
    /// Fail with ENOTSUP rather than be slower than a write.
    pub fast: bool,
}

/// Bytes a READ returns, owned so an io_uring or C completion can fill them
/// after the submitting future is gone.
pub use aligned::AlignedBuf;

pub enum ReadBuf {
    Vec(Vec<u8>),
    /// The bytes where they already are (the `mem` store's chunks), sent
    /// from there: no copy. `spare` is the buffer the caller lent, unused,
    /// kept for its pool.
    Shared {
        slices: Vec<SharedSlice>,
        spare: Vec<u8>,
    },
    Glommio(glommio::io::ReadResult),
    /// Read with O_DIRECT into an aligned buffer: the bytes asked for start
    /// at `start` of it.
    Aligned {
        buf: AlignedBuf,
        start: usize,
        len: usize,
    },
    /// Page-cache pages waiting in a pipe, spliced into the socket without
    /// a copy. Its bytes are not in memory: [`ReadBuf::slices`] yields
    /// none, [`ReadBuf::unspliced`] reads them out. `spare` as for `Shared`.
    Spliced {
        pipe: pipe::Spliced,
        spare: Vec<u8>,
    },
    /// Page-cache pages of a mapped file, which only the kernel may read
    /// ([`mapped`]): [`ReadBuf::slices`] hands them to `sendmsg`,
    /// [`ReadBuf::unspliced`] copies them with `pread`. `spare` as for `Shared`.
    Mapped {
        read: mapped::MappedRead,
        spare: Vec<u8>,
    },
}

/// Part of a [`ReadBuf::Shared`]: a range of an immutable chunk that the
/// read keeps alive (a later write to the chunk copies it first), or zeroes.
pub struct SharedSlice {
    pub chunk: Option<mem::ChunkBytes>,
    pub start: usize,
    pub len: usize,
}

impl SharedSlice {
    pub fn bytes(&self) -> &[u8] {
        static ZEROES: [u8; mem::CHUNK] = [0; mem::CHUNK];
        match &self.chunk {
            Some(c) => &c[self.start..self.start + self.len],
            None => &ZEROES[..self.len],
        }
    }
}

impl ReadBuf {
    /// The bytes read, in order: one slice, or one per chunk.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        let (one, shared): (Option<&[u8]>, &[SharedSlice]) = match self {
            ReadBuf::Vec(v) => (Some(v), &[]),
            ReadBuf::Glommio(r) => (Some(r), &[]),
            ReadBuf::Aligned { buf, start, len } => (Some(&buf[*start..*start + *len]), &[]),
            ReadBuf::Shared { slices, .. } => (None, slices),
            ReadBuf::Spliced { .. } => (None, &[]),
            ReadBuf::Mapped { read, .. } => (Some(read.for_kernel()), &[]),
        };
        one.into_iter().chain(shared.iter().map(SharedSlice::bytes))
    }

    pub fn len(&self) -> usize {
        match self {
            ReadBuf::Spliced { pipe, .. } => pipe.len(),
            _ => self.slices().map(<[u8]>::len).sum(),
        }
    }

    /// Whether the bytes are somewhere the runner may not read them as
    /// memory (a pipe, a file mapping): TLS must [`ReadBuf::unspliced`] them.
    pub fn outside_memory(&self) -> bool {
        matches!(self, ReadBuf::Spliced { .. } | ReadBuf::Mapped { .. })
    }

    /// The same bytes in memory: a spliced read is read out of its pipe, a
    /// mapped one copied by `pread` (for TLS, which must encrypt them, and
    /// for tests).
    pub fn unspliced(self) -> std::io::Result<ReadBuf> {
        match self {
            ReadBuf::Spliced { pipe, .. } => pipe.into_vec().map(ReadBuf::Vec),
            ReadBuf::Mapped { read, .. } => read.copy_out().map(ReadBuf::Vec),
            other => Ok(other),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the bytes, for tests and slow paths.
    pub fn to_vec(&self) -> Vec<u8> {
        if let ReadBuf::Mapped { read, .. } = self {
            return read.copy_out().unwrap_or_default();
        }
        self.slices().flatten().copied().collect()
    }

    /// The Vec back, for the connection's buffer pool.
    pub fn into_vec(self) -> Option<Vec<u8>> {
        match self {
            ReadBuf::Vec(v)
            | ReadBuf::Shared { spare: v, .. }
            | ReadBuf::Spliced { spare: v, .. }
            | ReadBuf::Mapped { spare: v, .. } => Some(v),
            ReadBuf::Glommio(_) | ReadBuf::Aligned { .. } => None,
        }
    }
}

/// The shared description of a backstore.
pub trait Backend: Send + Sync + 'static {
    /// Handler name: "mem", "file", ...
    fn handler(&self) -> &'static str;
    fn size(&self) -> u64;
    fn capabilities(&self) -> Capabilities;
    /// How IO is done, for operators: e.g. "ram", "buffered io_uring + fdatasync".
    fn mode(&self) -> String;
    /// Opens this backstore on the calling shard.
    fn attach(&self) -> IoFuture<'static, Rc<dyn BackendIo>>;
    /// Grows or shrinks the backstore to `size` bytes; later requests are
    /// checked against the new size. Blocking: control plane only.
    fn resize(&self, _size: u64) -> Result<(), BackendError> {
        Err(BackendError::Unsupported)
    }
}

/// Per-shard IO. Offsets and lengths are already range-checked by the protocol layer.
pub trait BackendIo {
    /// Reads `len` bytes at `offset`. `buf` is an empty buffer the caller
    /// lends (with capacity) to avoid an allocation; backends may ignore it.
    fn read(&self, offset: u64, len: usize, buf: Vec<u8>) -> IoFuture<'_, ReadBuf>;
    /// Writes `data` at `offset`; with `fua` it is durable before completion.
    /// Returns the buffer for reuse when the backend is done with it.
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> IoFuture<'_, Option<Vec<u8>>>;
    /// The piece size this backend keeps a write's payload in as received
    /// (the mem store's chunks), or None for one buffer.
    fn write_piece_size(&self) -> Option<usize> {
        None
    }
    /// Writes a payload received in pieces at `offset`: the first piece
    /// ends at a multiple of [`BackendIo::write_piece_size`], every other
    /// but the last is one whole piece.
    fn write_pieces(&self, offset: u64, pieces: Vec<Vec<u8>>, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.write(offset, pieces.concat(), fua).await?;
            Ok(())
        })
    }
    /// Makes every acknowledged write durable.
    fn flush(&self) -> IoFuture<'_, ()>;
    fn trim(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()>;
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()>;
    /// Prefetch hint.
    fn cache(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;
    /// Allocation map of `[offset, offset+len)`, in order, covering at least the first byte.
    fn extents(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>>;
}

/// A hole that reads as zeroes.
pub const HOLE: u32 = STATE_HOLE | STATE_ZERO;
/// Allocated data.
pub const DATA: u32 = 0;

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> Capabilities {
        Capabilities::all(false)
    }

    #[test]
    fn flags_follow_capabilities() {
        let f = caps().transmission_flags();
        for bit in [
            TF_HAS_FLAGS,
            TF_SEND_FLUSH,
            TF_SEND_FUA,
            TF_SEND_TRIM,
            TF_SEND_WRITE_ZEROES,
            TF_SEND_DF,
            TF_CAN_MULTI_CONN,
            TF_SEND_CACHE,
            TF_SEND_FAST_ZERO,
        ] {
            assert_ne!(f & bit, 0, "bit {bit:#x}");
        }
        assert_eq!(f & (TF_READ_ONLY | TF_ROTATIONAL), 0);
    }

    #[test]
    fn read_only_hides_write_side_commands() {
        let f = Capabilities {
            read_only: true,
            ..caps()
        }
        .transmission_flags();
        assert_ne!(f & TF_READ_ONLY, 0);
        assert_eq!(
            f & (TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO),
            0
        );
    }

    #[test]
    fn missing_capability_clears_flag() {
        let f = Capabilities {
            flush: false,
            fua: false,
            zero: false,
            ..caps()
        }
        .transmission_flags();
        assert_eq!(
            f & (TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO),
            0
        );
    }
}
