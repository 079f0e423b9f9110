//! TLS on the IO and control routes, against peers nobody here wrote:
//! libnbd (nbdinfo, nbdcopy) and qemu (GnuTLS both), with openssl-made
//! certificates. Every refusal is checked from the client's side and in
//! the runner's log, which must name the peer.

mod common;

use common::*;
use nbd_engine::protocol::consts::*;
use std::io::Write;
use std::path::Path;

fn tls_uri(r: &Runner, export: &str, pki: &Path) -> String {
    // libnbd checks the certificate against the host name.
    let port = r.addr.rsplit(':').next().unwrap();
    format!(
        "nbds://localhost:{port}/{export}?tls-certificates={}",
        pki.display()
    )
}

fn qemu_tls_args(r: &Runner, export: &str, pki: &Path) -> Vec<String> {
    let port = r.addr.rsplit(':').next().unwrap();
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            pki.display()
        ),
        "--image-opts".into(),
        format!("driver=nbd,host=localhost,port={port},export={export},tls-creds=tls0"),
    ]
}

fn fails_with(program: &str, args: &[String]) -> String {
    let out = run(program, args);
    assert!(!out.status.success(), "{program} {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A runner serving mem:disk0 (16 MiB) with the credentials in `pki`.
fn tls_runner(pki: &Path, extra: &[&str]) -> Runner {
    let mut args = vec![
        "--export",
        "mem:disk0,size=16M",
        "--tls-certificates",
        path_str(pki),
    ];
    args.extend_from_slice(extra);
    Runner::start_with(&args)
}

/// A client directory holding just `files` (name, copied from).
fn client_dir(files: &[(&str, &Path)]) -> tempfile::TempDir {
    let dir = scratch();
    for (name, from) in files {
        std::fs::copy(from, dir.path().join(name)).unwrap();
    }
    dir
}

#[test]
fn libnbd_and_qemu_move_data_over_tls_with_client_certificates() {
    let pki = make_certs();
    let pki = pki.path();
    // A file export too: its large reads are spliced from the page cache
    // on a plain socket, and must be read out of the pipe for TLS.
    let dir = scratch();
    let file = tmp_path(&dir, "disk.raw");
    let file_spec = format!("file:{},size=64M", path_str(&file));
    let r = Runner::start_with(&[
        "--export",
        "mem:disk0,size=64M",
        "--export",
        &file_spec,
        "--tls-certificates",
        path_str(pki),
        "--tls-verify-peer",
    ]);
    let uri = tls_uri(&r, "disk0", pki);
    let info = run_ok("nbdinfo", &[&uri]);
    assert!(info.contains("with TLS"), "{info}");

    // nbdcopy in and out, 64 requests in flight on each of 4 connections,
    // 4 KiB (many records per read) and 1 MiB (many records per request):
    // the bytes survive the round trip.
    let (src, back) = (tmp_path(&dir, "src"), tmp_path(&dir, "back"));
    let data = pattern(24 << 20, 42);
    write_file(&src, &data);
    let file_uri = tls_uri(&r, path_str(&file), pki);
    for (uri, size) in [(&uri, "4096"), (&uri, "1048576"), (&file_uri, "1048576")] {
        let rs = format!("--request-size={size}");
        run_ok("nbdcopy", &[&rs, path_str(&src), uri]);
        run_ok("nbdcopy", &[&rs, uri, path_str(&back)]);
        let got = std::fs::read(&back).unwrap();
        assert!(
            got[..data.len()] == data[..],
            "{uri}: data differs at request size {size}"
        );
        std::fs::remove_file(&back).unwrap();
    }

    // qemu-io writes and reads patterns through its own TLS stack.
    let mut args = qemu_tls_args(&r, "disk0", pki);
    for c in [
        "write -P 0xab 40M 1M",
        "read -P 0xab 40M 1M",
        "read -P 0 41M 64k",
    ] {
        args.extend(["-c".into(), c.into()]);
    }
    let out = run("qemu-io", &args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("fail"), "{text}");
    assert_eq!(text.matches("read ").count(), 2, "{text}");
    // qemu-img sees the same export size.
    let mut args = vec!["info".to_string()];
    args.extend(qemu_tls_args(&r, "disk0", pki));
    let info = String::from_utf8_lossy(&run("qemu-img", &args).stdout).into_owned();
    assert!(info.contains("64 MiB"), "{info}");
}

#[test]
fn plain_clients_wrong_certificates_and_plaintext_injection_are_refused_and_logged() {
    let pki = make_certs();
    let pki = pki.path();
    let other = make_certs();
    let dir = scratch();
    let log = tmp_path(&dir, "runner.log");
    let r = Runner::start_logged(
        &[
            "--export",
            "mem:disk0,size=16M",
            "--tls-certificates",
            path_str(pki),
            "--tls-verify-peer",
            "--list-exports",
        ],
        &log,
    );
    // Plain nbd:// gets nothing, not even the list of names.
    let err = fails_with("nbdinfo", &[r.uri("disk0")]);
    assert!(err.contains("opt_go") || err.contains("TLS"), "{err}");
    let err = fails_with("nbdinfo", &["--list".into(), r.uri("")]);
    assert!(!err.contains("disk0"), "{err}");
    let mut s = connect(&r.addr);
    s.write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    s.write_all(&option(OPT_LIST, &[])).unwrap();
    let (_, kind, body) = read_option_reply(&mut s).unwrap();
    assert_eq!(kind, REP_ERR_TLS_REQD);
    assert!(!String::from_utf8_lossy(&body).contains("disk0"));
    // EXPORT_NAME before TLS cannot be refused in words: the server hangs up.
    s.write_all(&option(OPT_EXPORT_NAME, b"disk0")).unwrap();
    assert!(closed_by_peer(&mut s));

    // No client certificate, a client certificate from another CA, and a
    // client that trusts another CA: all refused at the TLS handshake.
    let ca = pki.join("ca-cert.pem");
    let no_cert = client_dir(&[("ca-cert.pem", &ca)]);
    let foreign_cert = client_dir(&[
        ("ca-cert.pem", &ca),
        ("client-cert.pem", &other.path().join("client-cert.pem")),
        ("client-key.pem", &other.path().join("client-key.pem")),
    ]);
    for client in [no_cert.path(), foreign_cert.path(), other.path()] {
        let err = fails_with("nbdinfo", &[tls_uri(&r, "disk0", client)]);
        assert!(
            err.to_lowercase().contains("tls") || err.contains("certificate"),
            "{err}"
        );
        let err = fails_with("qemu-img", &{
            let mut a = vec!["info".to_string()];
            a.extend(qemu_tls_args(&r, "disk0", client));
            a
        });
        assert!(!err.is_empty());
    }

    // Options sent in the clear right behind STARTTLS must not be acted on
    // (CVE-2021-3716): the server ACKs STARTTLS, then drops the connection.
    let mut s = connect(&r.addr);
    let mut burst = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    burst.extend(option(OPT_STARTTLS, &[]));
    burst.extend(option(OPT_GO, &go_data("disk0")));
    s.write_all(&burst).unwrap();
    let (option, kind, _) = read_option_reply(&mut s).unwrap();
    assert_eq!((option, kind), (OPT_STARTTLS, REP_ACK));
    assert!(
        closed_by_peer(&mut s),
        "plaintext after STARTTLS was served"
    );

    // Through all of that the runner kept serving a proper client.
    let info = run_ok("nbdinfo", &[&tls_uri(&r, "disk0", pki)]);
    assert!(info.contains("with TLS"), "{info}");
    let log = std::fs::read_to_string(&log).unwrap();
    for want in [
        "did not start TLS",
        "peer sent no certificates",
        "data after STARTTLS",
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(want))
            .unwrap_or_else(|| panic!("no {want:?} in the log:\n{log}"));
        assert!(line.contains("peer=127.0.0.1:"), "{line}");
    }
    assert!(
        log.lines()
            .filter(|l| l.contains("TLS handshake failed"))
            .count()
            >= 3,
        "{log}"
    );
}

#[test]
fn tls_on_serves_both_and_tls_off_refuses_starttls() {
    let pki = make_certs();
    let r = tls_runner(pki.path(), &["--tls", "on"]);
    // Server-only TLS: a client with just the CA is fine, and so is plain.
    let ca_only = client_dir(&[("ca-cert.pem", &pki.path().join("ca-cert.pem"))]);
    assert!(run_ok("nbdinfo", &[&tls_uri(&r, "disk0", ca_only.path())]).contains("with TLS"));
    assert!(run_ok("nbdinfo", &[&r.uri("disk0")]).contains("without TLS"));
    let plain = Runner::start(&["mem:disk0,size=16M"]);
    // libnbd requires TLS with nbds:// and hangs up on NBD_REP_ERR_POLICY.
    fails_with("nbdinfo", &[tls_uri(&plain, "disk0", pki.path())]);
    let mut s = connect(&plain.addr);
    s.write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    s.write_all(&option(OPT_STARTTLS, &[])).unwrap();
    let (_, kind, _) = read_option_reply(&mut s).unwrap();
    assert_eq!(kind, REP_ERR_POLICY);
    assert_healthy(&plain.addr, "disk0");
}

#[test]
fn plain_text_beyond_loopback_or_a_readable_key_stops_the_runner_at_start() {
    let state = scratch();
    let base = [
        "--state-dir",
        path_str(state.path()),
        "--ioport",
        "0",
        "--rpcport",
        "0",
    ];
    let mut args = base.to_vec();
    args.extend(["--iohost", "0.0.0.0"]);
    let err = runner_refuses(&args);
    assert!(
        err.contains("--tls off") && err.contains("0.0.0.0"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let pki = make_certs();
    let key = pki.path().join("server-key.pem");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut args = base.to_vec();
    args.extend(["--tls-certificates", path_str(pki.path())]);
    let err = runner_refuses(&args);
    assert!(
        err.contains("server-key.pem") && err.contains("chmod 600"),
        "{err}"
    );
    let empty = scratch();
    let mut args = base.to_vec();
    args.extend([
        "--tls",
        "require",
        "--tls-certificates",
        path_str(empty.path()),
    ]);
    let err = runner_refuses(&args);
    assert!(err.contains("server-cert.pem"), "{err}");

    // With the operator's explicit --tls off, all addresses are served.
    let mut r = Runner::start_with(&[
        "--iohost",
        "0.0.0.0",
        "--tls",
        "off",
        "--export",
        "mem:d,size=1M",
    ]);
    assert!(r.addr.starts_with("0.0.0.0:"), "{}", r.addr);
    r.assert_alive();
}

#[test]
fn nbd_cli_reaches_the_control_route_over_tls() {
    let pki = make_certs();
    let r = Runner::start_with(&["--tls-certificates", path_str(pki.path())]);
    let token = path_str(&r.token_file).to_owned();
    let with_tls = |args: &[&str]| {
        let mut full = vec![
            "--host",
            r.rpc.as_str(),
            "--token-file",
            &token,
            "--tls-certificates",
            path_str(pki.path()),
        ];
        full.extend_from_slice(args);
        run(env!("CARGO_BIN_EXE_nbd-cli"), &full)
    };
    let out = with_tls(&["mem", "create", "tlsdisk", "size", "1M"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = with_tls(&["list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("tlsdisk"));
    // Loopback in plain text still works with the token.
    assert!(cli_ok(&r, &["list"]).contains("tlsdisk"));
    // A client that trusts another CA does not get in.
    let other = make_certs();
    let mut full = vec!["--host", r.rpc.as_str(), "--token-file", &token];
    full.extend(["--tls-certificates", path_str(other.path()), "list"]);
    let out = run(env!("CARGO_BIN_EXE_nbd-cli"), &full);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("TLS"), "{err}");
}

#[test]
fn the_kernel_maps_handshake_negotiates_tls_then_hands_the_session_to_kernel_tls() {
    use nbd_cli::kernel::{connect_export_with, NegotiateError};
    use std::time::Duration;
    let pki = make_certs();
    let r = tls_runner(pki.path(), &["--tls-verify-peer"]);
    let port = r.addr.rsplit(':').next().unwrap();
    let addr = format!("localhost:{port}");
    let t = Duration::from_secs(10);
    let good = nbd_control::tls::client_config(pki.path()).unwrap();
    match connect_export_with(&addr, "disk0", t, Some(&good)) {
        // This kernel has TLS: the socket now encrypts by itself, so plain
        // NBD requests written to it reach the runner.
        Ok((mut s, info)) => {
            assert_eq!(info.size, 16 << 20);
            assert_eq!(write_at(&mut s, 4096, &pattern(4096, 9)), 0);
            assert_eq!(read_at(&mut s, 4096, 4096).unwrap(), pattern(4096, 9));
        }
        // Hosts without the tls module get there and say so (the VM test
        // proves the kernel path); the handshake itself must have passed.
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("kernel has no TLS support"), "{e}");
        }
    }
    // Credentials that do not fit are refused at the TLS handshake.
    let other = make_certs();
    let wrong = nbd_control::tls::client_config(other.path()).unwrap();
    let e = connect_export_with(&addr, "disk0", t, Some(&wrong)).unwrap_err();
    assert!(matches!(e, NegotiateError::Tls { .. }), "{e}");
    // A runner without TLS says so before any export is asked for.
    let plain = Runner::start(&["mem:disk0,size=16M"]);
    let port = plain.addr.rsplit(':').next().unwrap();
    let e = connect_export_with(&format!("localhost:{port}"), "disk0", t, Some(&good)).unwrap_err();
    assert!(e.to_string().contains("does not offer TLS"), "{e}");
}

#[test]
fn from_another_host_plain_text_is_refused_on_both_routes_and_tls_gets_in() {
    let ns = match NetNs::new() {
        Ok(ns) => ns,
        // Root makes namespaces; tests/run.sh runs as root in CI.
        Err(e) if nbd_control::trust::euid() != 0 => return eprintln!("skipped: {e}"),
        Err(e) => panic!("cannot make a network namespace as root: {e}"),
    };
    let pki = make_certs_for(&format!("IP:{}", ns.host_ip));
    let pki = pki.path();
    let r = Runner::start_with(&[
        "--iohost",
        &ns.host_ip,
        "--rpchost",
        &ns.host_ip,
        "--export",
        "mem:disk0,size=16M",
        "--tls-certificates",
        path_str(pki),
    ]);
    let token = path_str(&r.token_file).to_owned();
    let cli = env!("CARGO_BIN_EXE_nbd-cli");
    // The control route from the other host: plain text is refused even
    // with the right token; TLS with it gets in.
    let out = ns.run(cli, &["--host", &r.rpc, "--token-file", &token, "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("needs TLS from other hosts"),
        "{err}"
    );
    let out = ns.run(
        cli,
        &[
            "--host",
            &r.rpc,
            "--token-file",
            &token,
            "--tls-certificates",
            path_str(pki),
            "list",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("disk0"));
    // The IO route: plain nbd:// is refused, nbds:// with the certificate works.
    let out = ns.run("nbdinfo", &[&r.uri("disk0")]);
    assert!(!out.status.success());
    let port = r.addr.rsplit(':').next().unwrap();
    let uri = format!(
        "nbds://{}:{port}/disk0?tls-certificates={}",
        ns.host_ip,
        pki.display()
    );
    let out = ns.run("nbdinfo", &[&uri]);
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && info.contains("with TLS"), "{info}");
}

#[test]
fn garbage_where_a_tls_handshake_belongs_is_refused_and_hurts_no_one() {
    let pki = make_certs();
    let r = tls_runner(pki.path(), &[]);
    let junk: Vec<u8> = std::iter::once(0x16).chain(pattern(4096, 3)).collect();
    // IO route: STARTTLS acknowledged, then no ClientHello but noise.
    let mut s = connect(&r.addr);
    s.write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    s.write_all(&option(OPT_STARTTLS, &[])).unwrap();
    let (_, kind, _) = read_option_reply(&mut s).unwrap();
    assert_eq!(kind, REP_ACK);
    let _ = s.write_all(&junk);
    assert!(
        closed_by_peer(&mut s),
        "noise instead of TLS was not refused"
    );
    // Control route: a first byte that promises TLS, then noise.
    let mut c = std::net::TcpStream::connect(&r.rpc).unwrap();
    let _ = c.write_all(&junk);
    assert!(
        closed_by_peer(&mut c),
        "the control route kept a bogus TLS peer"
    );
    // A truncated ClientHello and silence: cut off at the hello deadline.
    let mut c = std::net::TcpStream::connect(&r.rpc).unwrap();
    c.write_all(&[0x16, 0x03, 0x01]).unwrap();
    assert!(closed_by_peer(&mut c) || closed_by_peer(&mut c));
    // Everyone else is fine.
    let ca_only = client_dir(&[("ca-cert.pem", &pki.path().join("ca-cert.pem"))]);
    assert!(run_ok("nbdinfo", &[&tls_uri(&r, "disk0", ca_only.path())]).contains("with TLS"));
    assert!(cli_ok(&r, &["list"]).contains("disk0"));
}

#[test]
fn nbd_cli_with_unusable_client_credentials_says_so_in_one_line() {
    let r = Runner::start(&["mem:disk0,size=16M"]);
    let missing = scratch();
    let bad = scratch();
    std::fs::write(bad.path().join("ca-cert.pem"), "not a certificate").unwrap();
    for dir in [missing.path(), bad.path()] {
        cli_fails(
            &r,
            &["--tls-certificates", path_str(dir), "list"],
            "ca-cert.pem",
        );
    }
    // An empty environment variable means no TLS, not the current directory.
    let token = path_str(&r.token_file).to_owned();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nbd-cli"))
        .args(["--host", &r.rpc, "--token-file", &token, "list"])
        .env("NBD_RUNNER_TLS_CERTIFICATES", "")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_unix_io_route_is_owner_only_and_plain_where_tcp_requires_tls() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let pki = make_certs();
    let mut r = tls_runner(pki.path(), &["--tls-verify-peer"]);
    let meta = std::fs::metadata(&r.io_unix).unwrap();
    assert!(meta.file_type().is_socket(), "{meta:?}");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // TCP without TLS is refused; the local socket serves real clients
    // plainly: its mode is the authentication.
    fails_with("nbdinfo", &[r.uri("disk0")]);
    let info = run_ok("nbdinfo", &[&r.unix_uri("disk0")]);
    assert!(
        info.contains("without TLS") && info.contains("16777216"),
        "{info}"
    );
    qemu_io_patterns(&r.unix_uri("disk0"));
    // Another local user is kept out by the socket's mode alone, even
    // with the state directory opened to them.
    let state = r.io_unix.parent().unwrap().to_owned();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o711)).unwrap();
    let uri = r.unix_uri("disk0");
    let out = run("runuser", &["-u", "nobody", "--", "nbdinfo", &uri]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Permission denied"),
        "{err}"
    );
    // And by its credentials (SO_PEERCRED) should the mode ever be widened.
    std::fs::set_permissions(&r.io_unix, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = run("runuser", &["-u", "nobody", "--", "nbdinfo", &uri]);
    assert!(
        !out.status.success(),
        "a stranger was served on the unix socket"
    );
    // STARTTLS on the unix route is refused (there is nothing to protect),
    // and the route stays healthy.
    let mut s = std::os::unix::net::UnixStream::connect(&r.io_unix).unwrap();
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut s, &mut greeting).unwrap();
    s.write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    s.write_all(&option(OPT_STARTTLS, &[])).unwrap();
    let mut reply = [0u8; 20];
    std::io::Read::read_exact(&mut s, &mut reply).unwrap();
    let kind = u32::from_be_bytes(reply[12..16].try_into().unwrap());
    assert_eq!(kind, REP_ERR_POLICY);
    drop(s);
    assert!(run_ok("nbdinfo", &[&r.unix_uri("disk0")]).contains("without TLS"));
    // A clean stop removes the socket.
    r.stop();
    assert!(!r.io_unix.exists());
}
