//! Links librbd and librados through pkg-config when the `link` feature is on.
//! Debian's ceph 16 packages ship no .pc files, so a plain `-lrbd -lrados`
//! is the fallback when the shared libraries are on the default search path.

use std::path::Path;

const LIB_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_LINK").is_none() {
        return;
    }
    let found = ["librbd", "librados"]
        .iter()
        .all(|lib| pkg_config::Config::new().probe(lib).is_ok());
    if found {
        return;
    }
    for lib in ["rbd", "rados"] {
        let present = LIB_DIRS
            .iter()
            .any(|d| Path::new(d).join(format!("lib{lib}.so")).exists());
        if !present {
            panic!(
                "the ceph feature needs lib{lib}.so (neither pkg-config nor {LIB_DIRS:?} has it); \
                 install librbd-dev and librados-dev (Debian/Ubuntu) or librbd-devel (Fedora)"
            );
        }
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}
