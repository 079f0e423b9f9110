//! Hand-written, minimal FFI to GlusterFS libgfapi: the calls nbd-runner's
//! gluster handler uses, with the gluster 6+ (API 7.6+) signatures, where
//! async callbacks receive `(fd, ret, prestat, poststat, data)`.
//!
//! Linking comes from build.rs (pkg-config `glusterfs-api`). Unversioned
//! symbols resolve to the library's default versions, which are the
//! `GFAPI_6.0` ones for every call declared here that has two.
#![allow(non_camel_case_types)]

use libc::{c_char, c_int, c_void, mode_t, size_t, ssize_t, timespec};
use std::marker::{PhantomData, PhantomPinned};

/// `off_t` as glfs.h sees it: always 64 bits (it requires _FILE_OFFSET_BITS=64).
pub type off_t = i64;

/// A virtual mount of one volume (`glfs_t`).
#[repr(C)]
pub struct glfs_t {
    _private: [u8; 0],
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// An open file on a volume (`glfs_fd_t`).
#[repr(C)]
pub struct glfs_fd_t {
    _private: [u8; 0],
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// `struct glfs_stat` (glfs.h): pre/post attributes handed to callbacks.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct glfs_stat {
    pub glfs_st_mask: u64,
    pub glfs_st_attributes: u64,
    pub glfs_st_attributes_mask: u64,
    pub glfs_st_atime: timespec,
    pub glfs_st_btime: timespec,
    pub glfs_st_ctime: timespec,
    pub glfs_st_mtime: timespec,
    pub glfs_st_ino: u64,
    pub glfs_st_size: off_t,
    pub glfs_st_blocks: i64,
    pub glfs_st_rdev_major: u32,
    pub glfs_st_rdev_minor: u32,
    pub glfs_st_dev_major: u32,
    pub glfs_st_dev_minor: u32,
    pub glfs_st_blksize: libc::blksize_t,
    pub glfs_st_nlink: libc::nlink_t,
    pub glfs_st_uid: libc::uid_t,
    pub glfs_st_gid: libc::gid_t,
    pub glfs_st_mode: mode_t,
}

/// `struct stat` with 64-bit offsets, as glfs_fstat/glfs_stat fill it.
pub type stat = libc::stat64;

/// Completion callback of the `*_async` calls; runs on a gfapi thread with
/// `errno` set when `ret` is negative.
pub type glfs_io_cbk = Option<
    unsafe extern "C" fn(
        fd: *mut glfs_fd_t,
        ret: ssize_t,
        prestat: *mut glfs_stat,
        poststat: *mut glfs_stat,
        data: *mut c_void,
    ),
>;

extern "C" {
    pub fn glfs_new(volname: *const c_char) -> *mut glfs_t;
    pub fn glfs_set_volfile_server(
        fs: *mut glfs_t,
        transport: *const c_char,
        host: *const c_char,
        port: c_int,
    ) -> c_int;
    pub fn glfs_set_logging(fs: *mut glfs_t, logfile: *const c_char, loglevel: c_int) -> c_int;
    pub fn glfs_set_xlator_option(
        fs: *mut glfs_t,
        xlator: *const c_char,
        key: *const c_char,
        value: *const c_char,
    ) -> c_int;
    pub fn glfs_init(fs: *mut glfs_t) -> c_int;
    pub fn glfs_fini(fs: *mut glfs_t) -> c_int;

    pub fn glfs_open(fs: *mut glfs_t, path: *const c_char, flags: c_int) -> *mut glfs_fd_t;
    pub fn glfs_creat(
        fs: *mut glfs_t,
        path: *const c_char,
        flags: c_int,
        mode: mode_t,
    ) -> *mut glfs_fd_t;
    pub fn glfs_close(fd: *mut glfs_fd_t) -> c_int;
    pub fn glfs_stat(fs: *mut glfs_t, path: *const c_char, buf: *mut stat) -> c_int;
    pub fn glfs_fstat(fd: *mut glfs_fd_t, buf: *mut stat) -> c_int;
    pub fn glfs_unlink(fs: *mut glfs_t, path: *const c_char) -> c_int;
    pub fn glfs_lseek(fd: *mut glfs_fd_t, offset: off_t, whence: c_int) -> off_t;
    pub fn glfs_ftruncate(
        fd: *mut glfs_fd_t,
        length: off_t,
        prestat: *mut glfs_stat,
        poststat: *mut glfs_stat,
    ) -> c_int;
    /// `keep_size` is passed through as the fallocate(2) mode.
    pub fn glfs_fallocate(
        fd: *mut glfs_fd_t,
        keep_size: c_int,
        offset: off_t,
        len: size_t,
    ) -> c_int;
    pub fn glfs_zerofill(fd: *mut glfs_fd_t, offset: off_t, len: off_t) -> c_int;
    pub fn glfs_pread(
        fd: *mut glfs_fd_t,
        buf: *mut c_void,
        count: size_t,
        offset: off_t,
        flags: c_int,
        poststat: *mut glfs_stat,
    ) -> ssize_t;
    pub fn glfs_pwrite(
        fd: *mut glfs_fd_t,
        buf: *const c_void,
        count: size_t,
        offset: off_t,
        flags: c_int,
        prestat: *mut glfs_stat,
        poststat: *mut glfs_stat,
    ) -> ssize_t;
    pub fn glfs_fdatasync(
        fd: *mut glfs_fd_t,
        prestat: *mut glfs_stat,
        poststat: *mut glfs_stat,
    ) -> c_int;

    pub fn glfs_pread_async(
        fd: *mut glfs_fd_t,
        buf: *mut c_void,
        count: size_t,
        offset: off_t,
        flags: c_int,
        cbk: glfs_io_cbk,
        data: *mut c_void,
    ) -> c_int;
    /// `count` is an `int` in glfs.h.
    pub fn glfs_pwrite_async(
        fd: *mut glfs_fd_t,
        buf: *const c_void,
        count: c_int,
        offset: off_t,
        flags: c_int,
        cbk: glfs_io_cbk,
        data: *mut c_void,
    ) -> c_int;
    pub fn glfs_fdatasync_async(fd: *mut glfs_fd_t, cbk: glfs_io_cbk, data: *mut c_void) -> c_int;
    pub fn glfs_discard_async(
        fd: *mut glfs_fd_t,
        offset: off_t,
        len: size_t,
        cbk: glfs_io_cbk,
        data: *mut c_void,
    ) -> c_int;
    pub fn glfs_zerofill_async(
        fd: *mut glfs_fd_t,
        offset: off_t,
        len: off_t,
        cbk: glfs_io_cbk,
        data: *mut c_void,
    ) -> c_int;
}

#[cfg(all(test, gfapi))]
mod layout_tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    extern "C" {
        fn gfapi_sys_sizeof_glfs_stat() -> usize;
        fn gfapi_sys_offsetof_glfs_st_size() -> usize;
        fn gfapi_sys_offsetof_glfs_st_mode() -> usize;
        fn gfapi_sys_sizeof_stat() -> usize;
        fn gfapi_sys_offsetof_st_size() -> usize;
        fn gfapi_sys_sizeof_off_t() -> usize;
    }

    #[test]
    fn struct_layouts_match_the_installed_headers() {
        // SAFETY: the probes only return constants.
        unsafe {
            assert_eq!(size_of::<glfs_stat>(), gfapi_sys_sizeof_glfs_stat());
            assert_eq!(
                offset_of!(glfs_stat, glfs_st_size),
                gfapi_sys_offsetof_glfs_st_size()
            );
            assert_eq!(
                offset_of!(glfs_stat, glfs_st_mode),
                gfapi_sys_offsetof_glfs_st_mode()
            );
            assert_eq!(size_of::<stat>(), gfapi_sys_sizeof_stat());
            assert_eq!(offset_of!(stat, st_size), gfapi_sys_offsetof_st_size());
            assert_eq!(size_of::<off_t>(), gfapi_sys_sizeof_off_t());
        }
    }
}
