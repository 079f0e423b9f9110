//! librbd asynchronous IO completed back onto the issuing shard.
//!
//! Each request's context (the shard's [`Completer`] and the data buffer) is
//! boxed and handed to librbd as the completion argument. librbd's callback,
//! on its own thread, takes the box back and completes onto the shard. The
//! buffer therefore lives until librbd is done with it even if the awaiting
//! future was dropped: a cancelled request can never free memory librbd is
//! still reading or writing.

use super::rados::Image;
use crate::backend::completion::CallbackContext;
use crate::backend::BackendError;
use rbd_sys::*;
use std::os::raw::{c_int, c_void};
use std::ptr;

/// What a finished aio hands back to the shard.
pub struct AioDone {
    /// librbd's return value: bytes for reads, 0 for the rest, or -errno.
    pub ret: isize,
    pub buf: Vec<u8>,
}

/// What librbd may touch until it calls back: the data buffer.
type Ctx = CallbackContext<Vec<u8>, AioDone>;

unsafe extern "C" fn on_complete(c: rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `c` is the completion we created; releasing it in its own
    // callback is allowed. `arg` is the context of `submit`, and librbd
    // calls back exactly once.
    let ret = unsafe { rbd_aio_get_return_value(c) };
    unsafe { rbd_aio_release(c) };
    unsafe { Ctx::complete(arg, |buf| AioDone { ret, buf }) };
}

fn errno_error(context: &'static str, errno: isize) -> BackendError {
    BackendError::io(
        context,
        std::io::Error::from_raw_os_error((-errno).clamp(1, 4095) as i32),
    )
}

/// Issues one aio with `buf` owned by the completion; `issue` gets the
/// image, the completion and a pointer to the buffer's storage.
async fn submit(
    image: &Image,
    context: &'static str,
    buf: Vec<u8>,
    issue: impl FnOnce(rbd_image_t, rbd_completion_t, *mut u8) -> c_int,
) -> Result<AioDone, BackendError> {
    let mut ctx = Ctx::new(buf).map_err(|(e, _)| BackendError::io(context, e))?;
    let mut c = ptr::null_mut();
    // SAFETY: out-pointer to a local; the context stays valid until the callback.
    let r = unsafe { rbd_aio_create_completion(ctx.arg(), Some(on_complete), &mut c) };
    if r < 0 {
        drop(ctx.refused());
        return Err(errno_error(context, r as isize));
    }
    let data = ctx.keep_mut().as_mut_ptr();
    let r = issue(image.raw(), c, data);
    if r < 0 {
        // Refused at submission: no callback will come, so we clean up.
        // SAFETY: the completion is ours alone again.
        unsafe { rbd_aio_release(c) };
        drop(ctx.refused());
        return Err(errno_error(context, r as isize));
    }
    let out = ctx.submitted().await;
    if out.ret < 0 {
        return Err(errno_error(context, out.ret));
    }
    Ok(out)
}

pub async fn read(
    image: &Image,
    offset: u64,
    len: usize,
    mut buf: Vec<u8>,
) -> Result<Vec<u8>, BackendError> {
    buf.clear();
    buf.reserve_exact(len);
    let mut out = submit(image, "rbd read", buf, |img, c, data| {
        // SAFETY: `data` has capacity for `len` bytes and is owned by the
        // completion context until the callback.
        unsafe { rbd_aio_read(img, offset, len, data.cast(), c) }
    })
    .await?;
    let n = (out.ret as usize).min(len);
    // SAFETY: librbd wrote the first `n` bytes (it returns the count read).
    unsafe { out.buf.set_len(n) };
    Ok(out.buf)
}

pub async fn write(image: &Image, offset: u64, data: Vec<u8>) -> Result<Vec<u8>, BackendError> {
    let len = data.len();
    let out = submit(image, "rbd write", data, |img, c, data| {
        // SAFETY: `data` holds `len` initialised bytes owned by the context.
        unsafe { rbd_aio_write(img, offset, len, data.cast_const().cast(), c) }
    })
    .await?;
    Ok(out.buf)
}

pub async fn flush(image: &Image) -> Result<(), BackendError> {
    submit(image, "rbd flush", Vec::new(), |img, c, _| {
        // SAFETY: valid image and completion.
        unsafe { rbd_aio_flush(img, c) }
    })
    .await
    .map(drop)
}

pub async fn discard(image: &Image, offset: u64, len: u64) -> Result<(), BackendError> {
    submit(image, "rbd discard", Vec::new(), |img, c, _| {
        // SAFETY: valid image and completion.
        unsafe { rbd_aio_discard(img, offset, len, c) }
    })
    .await
    .map(drop)
}

/// Zeroes a range; `thick` keeps it allocated (NBD's NO_HOLE).
pub async fn write_zeroes(
    image: &Image,
    offset: u64,
    len: u64,
    thick: bool,
) -> Result<(), BackendError> {
    // RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
    let flags = c_int::from(thick);
    submit(image, "rbd write_zeroes", Vec::new(), |img, c, _| {
        // SAFETY: valid image and completion.
        unsafe { rbd_aio_write_zeroes(img, offset, len as usize, c, flags, 0) }
    })
    .await
    .map(drop)
}
