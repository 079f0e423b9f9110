//! Kernel attach for real: boots Debian's 6.1 kernel (which has nbd.ko)
//! under QEMU with tests/vm/, and inside it runs tests/vm/guest-attach.sh:
//! nbd-runner plus the nbd-attach example (nbd_cli::kernel) map, use,
//! unmap, reattach after kill -9 (RECONFIGURE) and map read-only; then
//! tests/vm/guest-cli.sh does the operator's flow with nbd-cli,
//! tests/vm/guest-tls.sh maps over kernel TLS, tests/vm/guest-restart.sh
//! restarts and upgrades the runner under fio with `nbd-cli watch`
//! reattaching, tests/vm/guest-swap.sh swaps onto a mapped device, and
//! with the
//! gluster feature tests/vm/guest-gluster.sh maps a gluster backstore; with
//! the ceph feature tests/vm/guest-ceph.sh maps a ceph backstore and resizes
//! it under the kernel.
//!
//! The guest sees the host's / read-only, so it runs the binaries of this
//! build at their host paths. The test skips (prints `SKIP: ...`) only when
//! the VM cannot be set up or does not boot; any failure inside the guest
//! fails it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

/// Exit code of tests/vm/setup.sh when this machine cannot run the VM.
const SETUP_CANNOT: i32 = 77;
/// Exit code of tests/vm/run-in-vm.sh when the VM did not boot.
const VM_DID_NOT_BOOT: i32 = 125;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Straight to the real stderr: the harness captures `eprintln!`, and a
/// skip must be seen.
fn skip(reason: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP: kernel attach test: {reason}");
}

fn tail(bytes: &[u8], lines: usize) -> String {
    let s = String::from_utf8_lossy(bytes);
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn show(what: &str, out: &Output) {
    eprintln!(
        "--- {what}: {}\n--- stdout:\n{}\n--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the nbd-attach example into the same target directory and
/// profile as this test's binaries, and returns its path. A no-op when
/// `cargo test --all-targets` (tests/run.sh) already built it.
fn build_attach_example(profile_dir: &Path) -> PathBuf {
    let target_dir = profile_dir.parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo()).args([
        "build",
        "--quiet",
        "-p",
        "nbd-cli",
        "--example",
        "nbd-attach",
        "--target-dir",
    ]);
    cmd.arg(target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd.output().expect("run cargo build --example nbd-attach");
    if !out.status.success() {
        show("cargo build --example nbd-attach", &out);
        panic!("building the nbd-attach example failed");
    }
    let exe = profile_dir.join("examples").join("nbd-attach");
    assert!(exe.exists(), "{} missing after build", exe.display());
    exe
}

/// A guest script: its environment, the lines its output must have, and
/// the VM's own environment (run-in-vm.sh's VM_*).
struct GuestRun(
    &'static str,
    String,
    &'static [&'static str],
    Vec<(&'static str, PathBuf)>,
);

#[test]
fn kernel_attach_in_vm() {
    let t0 = Instant::now();
    let runner = PathBuf::from(env!("CARGO_BIN_EXE_nbd-runner"));
    let profile_dir = runner.parent().unwrap().to_path_buf();
    let vm_dir = std::env::var_os("VM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| profile_dir.parent().unwrap().join("nbd-vm"));
    let vm = repo().join("tests/vm");

    // 1. The VM: idempotent, fast once done.
    let out = Command::new("bash")
        .arg(vm.join("setup.sh"))
        .env("VM_DIR", &vm_dir)
        .output()
        .expect("run tests/vm/setup.sh");
    match out.status.code() {
        Some(0) => {}
        Some(SETUP_CANNOT) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let reason = err
                .lines()
                .rfind(|l| l.contains("cannot set up the VM"))
                .map(str::to_owned)
                .unwrap_or_else(|| tail(&out.stderr, 3));
            return skip(&reason);
        }
        _ => {
            show("tests/vm/setup.sh", &out);
            panic!("tests/vm/setup.sh failed unexpectedly ({})", out.status);
        }
    }
    let t_setup = t0.elapsed();

    // 2. The example that drives nbd_cli::kernel in the guest.
    let attach = build_attach_example(&profile_dir);

    // 3. Boot, run each guest script, power off: the kernel layer itself,
    // then the operator's flow through nbd-cli and the control route.
    let cli = PathBuf::from(env!("CARGO_BIN_EXE_nbd-cli"));
    let t1 = Instant::now();
    let mut runs: Vec<GuestRun> = vec![
        GuestRun(
            "guest-attach.sh",
            format!(
                "NBD_RUNNER='{}' NBD_ATTACH='{}'",
                runner.display(),
                attach.display()
            ),
            &[
                "GUEST-ATTACH-OK",
                "20 MiB file identical after disconnect/connect",
                "20 MiB file identical after kill -9 + restart + reconfigure",
                "dd refused",
            ],
            vec![],
        ),
        GuestRun(
            "guest-cli.sh",
            format!(
                "NBD_RUNNER='{}' NBD_CLI='{}' NBD_ATTACH='{}'",
                runner.display(),
                cli.display(),
                attach.display()
            ),
            &[
                "GUEST-CLI-OK",
                "CLI: 20 MiB file identical after unmap and map",
                "CLI: restarted runner lists",
                "CLI: reattached",
                "CLI: readonly map refused writes",
                "CLI: unmap left a device serving another backstore alone",
                "CLI: swap safety on",
            ],
            vec![],
        ),
    ];
    // A map over kernel TLS, with packet captures of TLS and plain maps.
    runs.push(GuestRun(
        "guest-tls.sh",
        format!(
            "NBD_RUNNER='{}' NBD_CLI='{}' REPO='{}'",
            runner.display(),
            cli.display(),
            repo().display()
        ),
        &[
            "GUEST-TLS-OK",
            "TLS: plain map refused",
            "TLS: a local map goes over the unix socket",
            "TLS: ext4 over a kernel-TLS map round-trips, no plaintext on the wire",
            "TLS: the plain map shows",
        ],
        vec![],
    ));
    // Restarts and an upgrade under fio load, reattached by nbd-cli watch.
    runs.push(GuestRun(
        "guest-restart.sh",
        format!(
            "NBD_RUNNER='{}' NBD_CLI='{}'",
            runner.display(),
            cli.display()
        ),
        &[
            "GUEST-RESTART-OK",
            "RESTART: 1 (SIGTERM) reattached",
            "RESTART: 3 (kill -9) reattached",
            "RESTART: 4 (upgrade: SIGTERM, binary replaced, start) reattached",
            "RESTART: fio finished with 0 errors and verify passed",
            "RESTART: dmesg shows no I/O error",
            "RESTART: list shows 4 reattaches",
        ],
        vec![],
    ));
    // Swap on a mapped device served from a virtio disk (a sparse host
    // file), not from the guest's RAM; over the runner's unix socket, the
    // route that carries the kernel's reserve-backed writes.
    {
        let disk = vm_dir.join("scratch.img");
        let f = std::fs::File::create(&disk).expect("create the VM's scratch disk");
        f.set_len(1 << 30).expect("size the VM's scratch disk");
        drop(f);
        runs.push(GuestRun(
            "guest-swap.sh",
            format!(
                "NBD_RUNNER='{}' NBD_CLI='{}'",
                runner.display(),
                cli.display()
            ),
            &[
                "GUEST-SWAP-OK",
                "SWAP: runner VmLck",
                "SWAP: the hog finished through swap",
                "SWAP: no kernel errors",
            ],
            // Swap under emulation moves a few MB/s: this run takes minutes.
            vec![
                ("VM_DISK", disk),
                ("VM_MEM", "768M".into()),
                ("VM_TIMEOUT", "600".into()),
            ],
        ));
    }
    // The Debian package under a real systemd as PID 1: tests/package.sh
    // (run by tests/run.sh as root) leaves the .deb in target/debian/.
    let deb = std::fs::read_dir(repo().join("target/debian"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    match deb {
        Some(deb) => runs.push(GuestRun(
            "guest-systemd.sh",
            format!("NBD_DEB='{}'", deb.display()),
            &[
                "GUEST-SYSTEMD-OK",
                "SYSTEMD: PID 1 is systemd",
                "SYSTEMD: nbd-runner.service active",
                "SYSTEMD: reattached by nbd-cli-watch.service, data intact",
            ],
            vec![("VM_INIT", "systemd".into())],
        )),
        None => eprintln!(
            "kernel test: no target/debian/*.deb (tests/package.sh builds it as root): \
             the systemd guest run is skipped"
        ),
    }
    // Gluster in the guest: the guest has no NIC, so it runs its own glusterd
    // (tests/run.sh installs the packages and builds with the feature).
    if cfg!(feature = "gluster") && std::env::var_os("NBD_TEST_GLUSTER_VOLUME").is_some() {
        runs.push(GuestRun(
            "guest-gluster.sh",
            format!(
                "NBD_RUNNER='{}' NBD_CLI='{}' REPO='{}'",
                runner.display(),
                cli.display(),
                repo().display()
            ),
            &[
                "GUEST-GLUSTER-OK",
                "GLUSTER: 20 MiB file identical after unmap and map",
            ],
            vec![],
        ));
    }
    // Ceph in the guest, the same way: its own mon and memstore OSD.
    if cfg!(feature = "ceph") && std::env::var_os("NBD_TEST_CEPH_CONF").is_some() {
        runs.push(GuestRun(
            "guest-ceph.sh",
            format!(
                "NBD_RUNNER='{}' NBD_CLI='{}' REPO='{}'",
                runner.display(),
                cli.display(),
                repo().display()
            ),
            &[
                "GUEST-CEPH-OK",
                "CEPH: the kernel sees 128 MiB after resize, data intact",
                "CEPH: the kernel sees 96 MiB after shrink",
            ],
            vec![],
        ));
    }
    let mut accel = String::new();
    for GuestRun(script, env, want, vm_env) in runs {
        let guest = format!("{env} bash '{}'", vm.join(script).display());
        let out = Command::new("bash")
            .arg(vm.join("run-in-vm.sh"))
            .arg(&guest)
            .env("VM_DIR", &vm_dir)
            .env("VM_TIMEOUT", "480")
            .envs(vm_env)
            .output()
            .expect("run tests/vm/run-in-vm.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() == Some(VM_DID_NOT_BOOT) && stderr.contains("VM did not boot") {
            return skip(&format!("the VM did not boot:\n{}", tail(&out.stderr, 12)));
        }
        show(&format!("{script} in the VM"), &out);
        assert!(
            out.status.success(),
            "{script} failed in the VM ({}); see the output above",
            out.status
        );
        for line in want {
            assert!(
                stdout.contains(line),
                "{script}: missing from the guest output: {line}"
            );
        }
        accel = stderr
            .lines()
            .find(|l| l.starts_with("[run-in-vm] accel"))
            .unwrap_or("")
            .to_owned();
    }
    let _ = std::fs::remove_file(vm_dir.join("scratch.img"));
    eprintln!(
        "kernel attach test: setup {:.1}s, VM run {:.1}s, total {:.1}s; {}",
        t_setup.as_secs_f64(),
        t1.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        accel
    );
}
