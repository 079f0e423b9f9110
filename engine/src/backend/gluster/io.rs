//! Per-shard IO through gfapi's `*_async` calls.
//!
//! Each call's context (the shard's [`Completer`], the buffer gfapi reads
//! or fills, and a hold on the fd) is boxed and handed to gfapi as the
//! callback's `data`. The callback, on a gfapi thread, takes the box back
//! and completes onto the shard, which is woken through its doorbell and
//! never blocks. The buffer travels inside the completed value, so a
//! request future dropped mid-flight never frees memory gfapi still uses.

use super::volume::Fd;
use crate::backend::completion::CallbackContext;
use crate::backend::{BackendError, DATA, HOLE};
use crate::protocol::Extent;
use gfapi_sys as ffi;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most extents one BLOCK_STATUS reply walks; the client asks again for more.
const MAX_EXTENTS: usize = 1024;
/// First and longest pause between retries while the volume is unreachable.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug)]
pub(super) enum Op {
    /// Fill the buffer from index `at` on with `len` bytes from `offset`.
    Read {
        offset: u64,
        len: usize,
        at: usize,
    },
    /// Write `len` bytes from buffer index `at` to `offset`.
    Write {
        offset: u64,
        len: usize,
        at: usize,
    },
    Datasync,
    Discard {
        offset: u64,
        len: u64,
    },
    Zerofill {
        offset: u64,
        len: u64,
    },
}

struct Done {
    ret: isize,
    errno: i32,
    buf: Option<Vec<u8>>,
}

/// What gfapi may touch until it calls back: the buffer, and the fd
/// (kept open until gfapi is done with it).
type Ctx = CallbackContext<(Option<Vec<u8>>, Arc<Fd>), Done>;

unsafe extern "C" fn on_complete(
    _fd: *mut ffi::glfs_fd_t,
    ret: isize,
    _pre: *mut ffi::glfs_stat,
    _post: *mut ffi::glfs_stat,
    data: *mut libc::c_void,
) {
    // gfapi sets errno before calling back with a negative ret.
    let errno = if ret < 0 {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        0
    };
    // SAFETY: `data` is the context of `submit`, handed back exactly once.
    unsafe { Ctx::complete(data, |(buf, _fd)| Done { ret, errno, buf }) };
}

/// Errors that mean "the volume is (re)connecting": retried, not returned.
fn transient(errno: i32) -> bool {
    matches!(errno, libc::ENOTCONN | libc::EBADFD | libc::ESTALE)
}

/// One async call; resolves on the calling shard.
async fn submit(fd: &Arc<Fd>, op: Op, mut buf: Option<Vec<u8>>) -> Done {
    let base = buf
        .as_mut()
        .map_or(std::ptr::null_mut(), |b| b.as_mut_ptr());
    let ctx = match Ctx::new((buf, fd.clone())) {
        Ok(ctx) => ctx,
        Err((e, (buf, _))) => {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            return Done {
                ret: -1,
                errno,
                buf,
            };
        }
    };
    let (f, cb, data) = (fd.raw(), Some(on_complete as _), ctx.arg());
    // SAFETY: the fd is open (ctx holds it); buffer ranges lie within the
    // Vec's allocation (reads: capacity, writes: length), which ctx owns
    // until the callback; gfapi calls `cb` exactly once iff it returns 0.
    let r = unsafe {
        match op {
            Op::Read { offset, len, at } => {
                ffi::glfs_pread_async(f, base.add(at).cast(), len, offset as i64, 0, cb, data)
            }
            Op::Write { offset, len, at } => ffi::glfs_pwrite_async(
                f,
                base.add(at).cast(),
                len as i32,
                offset as i64,
                0,
                cb,
                data,
            ),
            Op::Datasync => ffi::glfs_fdatasync_async(f, cb, data),
            Op::Discard { offset, len } => {
                ffi::glfs_discard_async(f, offset as i64, len as usize, cb, data)
            }
            Op::Zerofill { offset, len } => {
                ffi::glfs_zerofill_async(f, offset as i64, len as i64, cb, data)
            }
        }
    };
    if r < 0 {
        let errno = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        // Not submitted, so no callback: the context is ours again.
        let (buf, _fd) = ctx.refused();
        return Done {
            ret: -1,
            errno,
            buf,
        };
    }
    ctx.submitted().await
}

/// Waits between attempts while the volume is unreachable.
pub(super) struct Backoff {
    deadline: Instant,
    pause: Duration,
}

impl Backoff {
    pub fn new(retry_for: Duration) -> Self {
        Backoff {
            deadline: Instant::now() + retry_for,
            pause: RETRY_FIRST,
        }
    }

    /// After a failure with `errno`: sleeps and returns true if worth
    /// another attempt, false once the error is final.
    pub async fn wait(&mut self, key: &str, op: &str, errno: i32) -> bool {
        if !transient(errno) || Instant::now() >= self.deadline {
            return false;
        }
        if self.pause == RETRY_FIRST {
            tracing::warn!(
                backstore = key,
                op,
                errno,
                "gluster volume unreachable; retrying"
            );
        }
        glommio::timer::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(RETRY_MAX);
        true
    }
}

/// A shard's handle on one file.
pub(super) struct GlusterIo {
    pub fd: Arc<Fd>,
    pub size: u64,
    /// How long to keep retrying while the volume is unreachable.
    pub retry_for: Duration,
    pub key: Arc<str>,
}

fn io_err(context: &'static str, errno: i32) -> BackendError {
    BackendError::io(context, io::Error::from_raw_os_error(errno))
}

impl GlusterIo {
    /// Runs `op`, retrying while the volume reconnects (a brick restart):
    /// the request waits instead of failing, up to `retry_for`.
    async fn call(
        &self,
        context: &'static str,
        op: Op,
        mut buf: Option<Vec<u8>>,
    ) -> (Result<usize, BackendError>, Option<Vec<u8>>) {
        let mut backoff = Backoff::new(self.retry_for);
        loop {
            let d = submit(&self.fd, op, buf).await;
            if d.ret >= 0 {
                return (Ok(d.ret as usize), d.buf);
            }
            if !backoff.wait(&self.key, context, d.errno).await {
                return (Err(io_err(context, d.errno)), d.buf);
            }
            buf = d.buf;
        }
    }

    async fn simple(&self, context: &'static str, op: Op) -> Result<(), BackendError> {
        self.call(context, op, None).await.0.map(drop)
    }

    pub async fn read_into(
        &self,
        offset: u64,
        len: usize,
        mut v: Vec<u8>,
    ) -> Result<Vec<u8>, BackendError> {
        v.clear();
        v.reserve_exact(len);
        while v.len() < len {
            let at = v.len();
            let op = Op::Read {
                offset: offset + at as u64,
                len: len - at,
                at,
            };
            let (r, back) = self.call("gluster read", op, Some(v)).await;
            v = back.expect("the buffer comes back with the completion");
            let n = r?.min(len - at);
            if n == 0 {
                // Past the file's end (it shrank): reads as zeroes.
                v.resize(len, 0);
                break;
            }
            // SAFETY: gfapi filled [at, at+n) of the reserved capacity.
            unsafe { v.set_len(at + n) };
        }
        Ok(v)
    }

    pub async fn write_all(&self, offset: u64, mut data: Vec<u8>) -> Result<Vec<u8>, BackendError> {
        let mut at = 0;
        while at < data.len() {
            let op = Op::Write {
                offset: offset + at as u64,
                len: data.len() - at,
                at,
            };
            let (r, back) = self.call("gluster write", op, Some(data)).await;
            data = back.expect("the buffer comes back with the completion");
            match r? {
                0 => return Err(io_err("gluster short write", libc::ENOSPC)),
                n => at += n,
            }
        }
        Ok(data)
    }

    pub async fn datasync(&self) -> Result<(), BackendError> {
        self.simple("gluster fdatasync", Op::Datasync).await
    }

    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.simple("gluster discard", Op::Discard { offset, len })
            .await
    }

    pub async fn zerofill(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.simple("gluster zerofill", Op::Zerofill { offset, len })
            .await
    }

    /// SEEK_DATA/SEEK_HOLE walk on glommio's blocking pool (glfs_lseek waits
    /// on the network).
    pub async fn map_extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        let fd = self.fd.clone();
        let end = (offset + len).min(self.size);
        let walked = glommio::executor()
            .spawn_blocking(move || walk(offset, end, |pos, whence| fd.seek(pos, whence)))
            .await;
        match walked {
            Ok(v) => Ok(v),
            // A volume without seek support: all data, which is always true.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                Ok(vec![Extent {
                    len: end.saturating_sub(offset).max(1),
                    flags: DATA,
                }])
            }
            Err(e) => Err(BackendError::io("gluster seek", e)),
        }
    }
}

/// Alternating hole/data extents of `[pos, end)` from a seek function.
fn walk(
    mut pos: u64,
    end: u64,
    mut seek: impl FnMut(u64, i32) -> io::Result<Option<u64>>,
) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    while pos < end && out.len() < MAX_EXTENTS {
        let data = seek(pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
        let (next, flags) = if data > pos {
            (data, HOLE)
        } else {
            let hole = seek(pos, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            (hole.max(pos + 1), DATA)
        };
        out.push(Extent {
            len: next - pos,
            flags,
        });
        pos = next;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_alternates_holes_and_data() {
        // Data at [4096, 8192) and [16384, 20480) of a 32 KiB file.
        let data = [(4096u64, 8192u64), (16384, 20480)];
        let seek = |pos: u64, whence: i32| -> io::Result<Option<u64>> {
            Ok(match whence {
                libc::SEEK_DATA => data.iter().find(|d| d.1 > pos).map(|d| d.0.max(pos)),
                _ => Some(
                    data.iter()
                        .find(|d| d.0 <= pos && pos < d.1)
                        .map_or(pos, |d| d.1),
                ),
            })
        };
        let got = walk(0, 32768, seek).unwrap();
        let want = [
            (4096, HOLE),
            (4096, DATA),
            (8192, HOLE),
            (4096, DATA),
            (12288, HOLE),
        ];
        let got: Vec<(u64, u32)> = got.iter().map(|e| (e.len, e.flags)).collect();
        assert_eq!(got, want);
    }
}
