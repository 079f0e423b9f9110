/* Sizes and offsets of the C structs we mirror, as the installed headers
 * define them; tests compare them with the Rust declarations. */
#include <stddef.h>
#include <sys/stat.h>
#include <glusterfs/api/glfs.h>

size_t gfapi_sys_sizeof_glfs_stat(void) { return sizeof(struct glfs_stat); }
size_t gfapi_sys_offsetof_glfs_st_size(void) { return offsetof(struct glfs_stat, glfs_st_size); }
size_t gfapi_sys_offsetof_glfs_st_mode(void) { return offsetof(struct glfs_stat, glfs_st_mode); }
size_t gfapi_sys_sizeof_stat(void) { return sizeof(struct stat); }
size_t gfapi_sys_offsetof_st_size(void) { return offsetof(struct stat, st_size); }
size_t gfapi_sys_sizeof_off_t(void) { return sizeof(off_t); }
