//! Finds libgfapi through pkg-config and compiles the layout probe the
//! struct-size test compares against.

fn main() {
    println!("cargo:rerun-if-changed=src/layout.c");
    println!("cargo:rustc-check-cfg=cfg(gfapi)");
    // Gluster 6 ships API version 7.6; its async callbacks gained pre/poststat.
    let lib = match pkg_config::Config::new()
        .atleast_version("7.6")
        .probe("glusterfs-api")
    {
        Ok(lib) => lib,
        Err(e) if std::env::var_os("CARGO_FEATURE_LINK").is_some() => panic!(
            "libgfapi (glusterfs-api >= 7.6, gluster 6+) not found through pkg-config: {e}\n\
             Debian/Ubuntu: apt-get install libglusterfs-dev"
        ),
        Err(_) => return,
    };
    println!("cargo:rustc-cfg=gfapi");
    let mut build = cc::Build::new();
    build.file("src/layout.c");
    for p in &lib.include_paths {
        build.include(p);
    }
    for (k, v) in &lib.defines {
        build.define(k, v.as_deref());
    }
    // glfs.h wants 64-bit offsets; the .pc file normally says so itself.
    if !lib.defines.contains_key("_FILE_OFFSET_BITS") {
        build.define("_FILE_OFFSET_BITS", "64");
    }
    build.compile("gfapi_sys_layout");
}
