//! Raw declarations for the librados and librbd calls nbd-runner makes,
//! written by hand from `rados/librados.h` and `rbd/librbd.h` (Ceph 16+;
//! every call here is in the stable C API since Ceph 15). No logic lives
//! here: the safe wrappers are in nbd-engine's ceph backend.
//!
//! Return conventions (librbd): 0 or a byte count on success, a negative
//! errno on failure. aio write/discard/flush/write_zeroes complete with 0;
//! aio read completes with the number of bytes read.

#![allow(non_camel_case_types)]

use std::os::raw::{c_char, c_int, c_void};

pub type rados_t = *mut c_void;
pub type rados_ioctx_t = *mut c_void;
pub type rbd_image_t = *mut c_void;
pub type rbd_image_options_t = *mut c_void;
pub type rbd_completion_t = *mut c_void;
pub type rbd_callback_t = Option<unsafe extern "C" fn(cb: rbd_completion_t, arg: *mut c_void)>;
/// `(offset, length, exists, arg)`; a non-zero return stops the iteration.
pub type rbd_diff_cb_t = Option<unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int>;

pub const RBD_MAX_IMAGE_NAME_SIZE: usize = 96;
pub const RBD_MAX_BLOCK_NAME_SIZE: usize = 24;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rbd_image_info_t {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; RBD_MAX_BLOCK_NAME_SIZE],
    pub parent_pool: i64,
    pub parent_name: [c_char; RBD_MAX_IMAGE_NAME_SIZE],
}

// rbd_image_options_set_uint64 option names.
pub const RBD_IMAGE_OPTION_FORMAT: c_int = 0;
pub const RBD_IMAGE_OPTION_FEATURES: c_int = 1;
pub const RBD_IMAGE_OPTION_ORDER: c_int = 2;

// Image feature bits (rbd/features.h), with their `rbd` CLI names.
pub const RBD_FEATURES: &[(&str, u64)] = &[
    ("layering", 1 << 0),
    ("striping", 1 << 1),
    ("exclusive-lock", 1 << 2),
    ("object-map", 1 << 3),
    ("fast-diff", 1 << 4),
    ("deep-flatten", 1 << 5),
    ("journaling", 1 << 6),
    ("data-pool", 1 << 7),
];
pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
pub const RBD_FEATURE_FAST_DIFF: u64 = 1 << 4;
/// rbd_get_flags: the object map or fast-diff data is stale.
pub const RBD_FLAG_OBJECT_MAP_INVALID: u64 = 1 << 0;
pub const RBD_FLAG_FAST_DIFF_INVALID: u64 = 1 << 1;

/// `rbd_encryption_format_t` (librbd.h, Pacific and later).
pub const RBD_ENCRYPTION_FORMAT_LUKS1: c_int = 0;
pub const RBD_ENCRYPTION_FORMAT_LUKS2: c_int = 1;
/// `rbd_encryption_algorithm_t`.
pub const RBD_ENCRYPTION_ALGORITHM_AES256: c_int = 1;

/// `rbd_encryption_luks1_format_options_t` and `..._luks2_...`, which have
/// the same layout; load ignores `alg`.
#[repr(C)]
pub struct rbd_encryption_luks_format_options_t {
    pub alg: c_int,
    pub passphrase: *const c_char,
    pub passphrase_size: usize,
}

extern "C" {
    // librados: cluster handle and pool context.
    pub fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
    pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_connect(cluster: rados_t) -> c_int;
    pub fn rados_shutdown(cluster: rados_t);
    pub fn rados_ioctx_create(
        cluster: rados_t,
        pool_name: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    pub fn rados_ioctx_destroy(io: rados_ioctx_t);
    pub fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);

    // librbd: image lifecycle.
    pub fn rbd_image_options_create(opts: *mut rbd_image_options_t);
    pub fn rbd_image_options_destroy(opts: rbd_image_options_t);
    pub fn rbd_image_options_set_uint64(
        opts: rbd_image_options_t,
        optname: c_int,
        optval: u64,
    ) -> c_int;
    pub fn rbd_create4(
        io: rados_ioctx_t,
        name: *const c_char,
        size: u64,
        opts: rbd_image_options_t,
    ) -> c_int;
    pub fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    pub fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_encryption_format(
        image: rbd_image_t,
        format: c_int,
        opts: *mut rbd_encryption_luks_format_options_t,
        opts_size: usize,
    ) -> c_int;
    pub fn rbd_encryption_load(
        image: rbd_image_t,
        format: c_int,
        opts: *mut rbd_encryption_luks_format_options_t,
        opts_size: usize,
    ) -> c_int;
    pub fn rbd_close(image: rbd_image_t) -> c_int;
    pub fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    pub fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int;
    pub fn rbd_get_flags(image: rbd_image_t, flags: *mut u64) -> c_int;
    pub fn rbd_stat(image: rbd_image_t, info: *mut rbd_image_info_t, infosize: usize) -> c_int;
    pub fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;
    pub fn rbd_diff_iterate2(
        image: rbd_image_t,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: rbd_diff_cb_t,
        arg: *mut c_void,
    ) -> c_int;

    // librbd: asynchronous IO. The callback runs on a librbd thread.
    pub fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: rbd_callback_t,
        c: *mut rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_get_return_value(c: rbd_completion_t) -> isize;
    pub fn rbd_aio_release(c: rbd_completion_t);
    pub fn rbd_aio_read(
        image: rbd_image_t,
        off: u64,
        len: usize,
        buf: *mut c_char,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_write(
        image: rbd_image_t,
        off: u64,
        len: usize,
        buf: *const c_char,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_discard(image: rbd_image_t, off: u64, len: u64, c: rbd_completion_t) -> c_int;
    pub fn rbd_aio_write_zeroes(
        image: rbd_image_t,
        off: u64,
        len: usize,
        c: rbd_completion_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
    pub fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_info_matches_the_c_layout() {
        // 3 u64, an int, 24 chars (to 52), padding to 56, an i64, 96 chars.
        assert_eq!(
            std::mem::size_of::<rbd_image_info_t>(),
            24 + 8 + 24 + 8 + 96
        );
    }
}
