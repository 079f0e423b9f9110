#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and integration tests against real
# NBD clients (qemu-img/qemu-io, nbdinfo/nbdsh/nbdcopy, fio's nbd engine).
# Installs the system packages it needs when they are missing (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in fio:fio nbdkit:nbdkit nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdsh:libnbd-bin \
            qemu-img:qemu-utils qemu-io:qemu-utils qemu-nbd:qemu-utils \
            openssl:openssl tcpdump:tcpdump prometheus:prometheus promtool:prometheus man:man-db zsh:zsh fish:fish; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need+=(python3-libnbd)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: missing packages: ${need[*]} (run as root, or apt-get install them)" >&2
    exit 1
  fi
  echo "tests/run.sh: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi

# Debian's python3-libnbd lives beside /usr/bin/python3, which nbdsh must find
# first even when another python3 (pyenv, venv) leads the PATH.
export PATH="/usr/bin:$PATH"

# ---- gluster -------------------------------------------------------------------
# A real single-brick GlusterFS volume on loopback for tests/gluster.rs (the
# script installs glusterfs-server libglusterfs-dev attr when missing). Once it
# is up the gluster tests are expected: a broken volume fails them. Not root:
# skipped with a note (the tests then skip themselves too). The volume stays up.
gluster_features=()
if [ "$(id -u)" = 0 ] && [ "${NBD_TEST_GLUSTER:-1}" != 0 ]; then
  export NBD_TEST_GLUSTER_VOLUME=${NBD_TEST_GLUSTER_VOLUME:-nbdtest}
  export NBD_TEST_GLUSTER_BRICK=${NBD_TEST_GLUSTER_BRICK:-/var/tmp/nbd-runner-gluster/brick}
  export NBD_TEST_GLUSTER_SERVER=${NBD_TEST_GLUSTER_SERVER:-127.0.0.1}
  tests/gluster/start-gluster.sh "$NBD_TEST_GLUSTER_VOLUME" "$NBD_TEST_GLUSTER_BRICK"
  gluster_features=(--features nbd-cli/gluster)
else
  echo "tests/run.sh: not root (or NBD_TEST_GLUSTER=0): gluster tests skipped" >&2
fi

# ---- ceph ----------------------------------------------------------------------
# A real Ceph cluster (mon+mgr+1 memstore OSD, pool "rbd", cephx auth as in
# production) on loopback for tests/ceph.rs; the script installs ceph-mon ceph-osd ceph-mgr ceph-common
# librbd-dev librados-dev when missing. Once it is up the ceph tests are
# expected: a broken cluster fails them. Not root: skipped with a note (the
# tests then skip themselves too). The cluster stays up for the next run.
ceph_features=()
if [ "$(id -u)" = 0 ] && [ "${NBD_TEST_CEPH:-1}" != 0 ]; then
  NBD_TEST_CEPH_DIR=${NBD_TEST_CEPH_DIR:-/var/tmp/nbd-runner-cephx}
  CEPH_AUTH=cephx tests/ceph/start-ceph.sh "$NBD_TEST_CEPH_DIR" >/dev/null
  export NBD_TEST_CEPH_CONF=$NBD_TEST_CEPH_DIR/ceph.conf
  ceph_features=(--features nbd-cli/ceph)
else
  echo "tests/run.sh: not root (or NBD_TEST_CEPH=0): ceph tests skipped" >&2
fi

# ---- package -------------------------------------------------------------------
# The Debian package (cargo deb) built, installed with dpkg -i, checked from
# the installed paths and removed again. Root only, and with the gluster and
# ceph libraries the package links.
if [ "$(id -u)" = 0 ] && [ ${#gluster_features[@]} -gt 0 ] && [ ${#ceph_features[@]} -gt 0 ] \
   && [ "${NBD_TEST_PACKAGE:-1}" != 0 ]; then
  tests/package.sh
else
  echo "tests/run.sh: not root, no gluster/ceph (or NBD_TEST_PACKAGE=0): package test skipped" >&2
fi

# The fuzz crate lives outside the workspace; type-check it with the cfg
# cargo-fuzz sets, so its targets cannot rot.
RUSTFLAGS="--cfg fuzzing -D warnings" CARGO_TARGET_DIR=target/fuzz-check \
  cargo check --manifest-path fuzz/Cargo.toml --bins --quiet

exec cargo test --workspace --all-targets --no-fail-fast "${gluster_features[@]}" "${ceph_features[@]}" "$@"
