//! Real NBD clients nobody here wrote, against the mem and file backends:
//! qemu-img, qemu-io, nbdinfo, nbdcopy, libnbd (python) and fio.

mod common;

use common::*;
use std::path::Path;

const MIB: usize = 1 << 20;

/// A 16 MiB source image: patterned data with zero stretches between.
fn source_image(dir: &tempfile::TempDir) -> (std::path::PathBuf, Vec<u8>) {
    let mut data = pattern(16 * MIB, 1);
    data[4 * MIB..8 * MIB].fill(0);
    data[12 * MIB..].fill(0);
    let path = tmp_path(dir, "src.raw");
    write_file(&path, &data);
    (path, data)
}

/// qemu-img writes a raw image into an existing export.
fn qemu_img_into(src: &Path, uri: &str) {
    let args = [
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        path_str(src),
        uri,
    ];
    run_ok("qemu-img", &args);
}

fn read_back(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every test gets both backends: a RAM export and a file export.
fn both_backends(dir: &tempfile::TempDir) -> (Runner, [String; 2], std::path::PathBuf) {
    let file = tmp_path(dir, "disk.raw");
    let file_spec = format!("file:{},size=16M", path_str(&file));
    let runner = Runner::start(&["mem:disk0,size=16M", &file_spec]);
    let uris = [runner.uri("disk0"), runner.uri(path_str(&file))];
    (runner, uris, file)
}

#[test]
fn qemu_img_convert_in_and_out_keeps_every_byte() {
    let dir = scratch();
    let (src, data) = source_image(&dir);
    let (mut runner, uris, file) = both_backends(&dir);
    for (i, uri) in uris.iter().enumerate() {
        qemu_img_into(&src, uri);
        run_ok(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", path_str(&src), uri],
        );
        let out = tmp_path(&dir, &format!("out{i}.raw"));
        run_ok(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "raw", uri, path_str(&out)],
        );
        assert!(
            read_back(&out) == data,
            "{uri}: image differs after round trip"
        );
    }
    // The file export wrote through to the file itself.
    assert!(read_back(&file) == data, "backing file differs");
    runner.assert_alive();
}

#[test]
fn qemu_io_patterns_discard_and_write_zeroes() {
    let dir = scratch();
    let (mut runner, uris, _) = both_backends(&dir);
    for uri in &uris {
        qemu_io_patterns(uri);
    }
    runner.assert_alive();
}

#[test]
fn nbdinfo_reports_size_flags_and_block_sizes() {
    let dir = scratch();
    let ro = tmp_path(&dir, "ro.raw");
    write_file(&ro, &pattern(3 * MIB, 5));
    let ro_spec = format!("file:{},readonly", path_str(&ro));
    let runner = Runner::start(&["mem:disk0,size=1.5G", &ro_spec]);

    let info = |uri: &str| -> serde_json::Value {
        let out = run_ok("nbdinfo", &["--json", uri]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo json");
        v["exports"][0].clone()
    };
    let rw = info(&runner.uri("disk0"));
    assert_eq!(rw["export-name"], "disk0");
    assert_eq!(rw["export-size"], 1536u64 << 20);
    for (key, want) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_fast_zero", true),
        ("can_cache", true),
        ("can_df", true),
        ("can_multi_conn", true),
        ("is_rotational", false),
    ] {
        assert_eq!(rw[key], want, "{key} in {rw}");
    }
    assert_eq!(rw["block_size_minimum"], 1);
    assert_eq!(rw["block_size_preferred"], 4096);
    assert_eq!(rw["block_size_maximum"], 32u64 << 20);
    assert!(
        rw["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "base:allocation"),
        "no base:allocation in {rw}"
    );
    assert_eq!(rw["description"], "mem backstore");

    let ro_info = info(&runner.uri(path_str(&ro)));
    assert_eq!(ro_info["export-size"], 3u64 << 20);
    assert_eq!(ro_info["is_read_only"], true);
    assert_eq!(ro_info["can_trim"], false);
    assert_eq!(ro_info["can_zero"], false);

    // NBD_OPT_LIST reveals nothing by default (file export names are
    // host paths)...
    let refused = run("nbdinfo", &["--list", "--json", &runner.uri("")]);
    let out = String::from_utf8_lossy(&refused.stdout);
    assert!(
        !refused.status.success(),
        "listing worked without --list-exports: {out}"
    );
    assert!(
        !out.contains("disk0") && !out.contains(path_str(&ro)),
        "{out}"
    );
    // ...and names both exports with --list-exports.
    let listing = Runner::start_with(&[
        "--threads",
        "2",
        "--list-exports",
        "--export",
        "mem:disk0,size=1M",
        "--export",
        &ro_spec,
    ]);
    let list = run_ok("nbdinfo", &["--list", "--json", &listing.uri("")]);
    assert!(
        list.contains("\"disk0\"") && list.contains(path_str(&ro)),
        "{list}"
    );
}

#[test]
fn nbdcopy_round_trip_keeps_data_and_holes() {
    let dir = scratch();
    let (src, data) = source_image(&dir);
    let (mut runner, uris, _) = both_backends(&dir);
    for (i, uri) in uris.iter().enumerate() {
        run_ok(
            "nbdcopy",
            &["--connections=4", "--requests=32", path_str(&src), uri],
        );
        let out = tmp_path(&dir, &format!("copy{i}.raw"));
        run_ok("nbdcopy", &[uri, path_str(&out)]);
        assert!(read_back(&out) == data, "{uri}: nbdcopy round trip differs");
        // Zero stretches were copied as zeroes, so the export reports them
        // as holes and a sparse copy skips them.
        let holes = hole_bytes(uri);
        assert!(
            holes >= 7 * MIB as u64,
            "{uri}: only {holes} bytes of holes"
        );
    }
    runner.assert_alive();
}

#[test]
fn fio_verify_random_and_sequential() {
    let dir = scratch();
    let (mut runner, uris, _) = both_backends(&dir);
    for uri in &uris {
        fio_verify(uri);
    }
    runner.assert_alive();
}

#[test]
fn libnbd_structured_replies_and_block_status() {
    let dir = scratch();
    let (_runner, uris, _) = both_backends(&dir);
    for uri in &uris {
        let out = python(include_str!("py/block_status.py"), &[uri, "65536"]);
        assert_eq!(out.trim(), "ok");
    }
}

#[test]
fn libnbd_sixty_four_requests_in_flight() {
    let dir = scratch();
    let (_runner, uris, _) = both_backends(&dir);
    for uri in &uris {
        assert_eq!(python(include_str!("py/in_flight.py"), &[uri]).trim(), "ok");
    }
}

#[test]
fn libnbd_multi_conn_flush_visibility() {
    let dir = scratch();
    let (_runner, uris, _) = both_backends(&dir);
    for uri in &uris {
        assert_eq!(
            python(include_str!("py/multi_conn.py"), &[uri]).trim(),
            "ok"
        );
    }
}

#[test]
fn libnbd_server_side_range_and_permission_errors() {
    let dir = scratch();
    let ro = tmp_path(&dir, "ro.raw");
    write_file(&ro, &[0u8; 65536]);
    let ro_spec = format!("file:{},readonly", path_str(&ro));
    let runner = Runner::start(&["mem:disk0,size=10M", &ro_spec]);
    let out = python(
        include_str!("py/server_errors.py"),
        &[&runner.uri("disk0"), &runner.uri(path_str(&ro))],
    );
    assert_eq!(out.trim(), "ok");
}

/// `--export file:PATH,direct`: O_DIRECT, a 4 KiB minimum block size that
/// qemu honours (it aligns an odd write itself), and EINVAL for a client
/// that writes below it anyway.
#[test]
fn direct_file_export_serves_real_clients_aligned() {
    let dir = scratch();
    let (src, data) = source_image(&dir);
    let file = tmp_path(&dir, "direct.raw");
    let runner = Runner::start(&[&format!("file:{},size=16M,direct", path_str(&file))]);
    let uri = runner.uri(path_str(&file));
    let info = run_ok("nbdinfo", &["--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&info).expect("nbdinfo json");
    assert_eq!(v["exports"][0]["block_size_minimum"], 4096, "{v}");
    qemu_img_into(&src, &uri);
    assert!(
        read_back(&file) == data,
        "backing file differs after convert"
    );
    qemu_io(
        &uri,
        &["write -P 0x5a 1000 3000", "read -P 0x5a 1000 3000"],
        1,
    );
    let back = read_back(&file);
    assert!(back[1000..4000].iter().all(|&b| b == 0x5a));
    assert!(back[..1000] == data[..1000] && back[4000..8192] == data[4000..8192]);
    let out = python(include_str!("py/direct_misaligned.py"), &[&uri]);
    assert_eq!(out.trim(), "ok");
}

#[test]
fn ipv6_io_route_and_seed_keyword_forms() {
    // The seed's keyword grammar, on IPv6 loopback.
    let runner = Runner::start_with(&[
        "threads",
        "1",
        "--iohost",
        "::1",
        "--export",
        "mem:disk0,size=2M",
    ]);
    assert!(runner.addr.starts_with("[::1]:"), "{}", runner.addr);
    let out = run_ok("nbdinfo", &["--size", &runner.uri("disk0")]);
    assert_eq!(out.trim(), (2u64 << 20).to_string());
}

/// One op's counters from `nbd-cli stats --json`: (count, bytes, errors).
fn op_stats(runner: &Runner, export: &str, op: &str) -> (u64, u64, u64) {
    let out = cli_ok(runner, &["stats", export, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("stats json");
    let o = v["ops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["op"] == op)
        .unwrap_or_else(|| panic!("no {op} in {v}"))
        .clone();
    let n = |k: &str| o[k].as_u64().unwrap_or_else(|| panic!("{k} in {o}"));
    (n("count"), n("bytes"), n("errors"))
}

/// Runs a qemu-io script, tracing its option negotiation; asserts success
/// and `reads` verified reads, and returns stderr (the trace).
fn qemu_io_traced(uri: &str, script: &[&str], reads: usize) -> String {
    let mut args = vec!["--trace", "nbd_receive_option_reply", "-f", "raw", uri];
    for c in script {
        args.extend(["-c", c]);
    }
    let out = run("qemu-io", &args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "qemu-io: {stdout}\n{stderr}");
    assert!(
        !stdout.contains("failed") && !stdout.contains("error") && !stdout.contains("cannot"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("read ").count(), reads, "{stdout}");
    stderr.into_owned()
}

/// qemu 10 negotiates extended headers on its own: 64-bit effect lengths
/// let one WRITE_ZEROES and one TRIM cover 5 GiB of a sparse file export,
/// and the bytes around them stay as they were. qemu-io refuses discards
/// over 2 GiB itself, so the 5 GiB TRIM comes from the test's own
/// extended-header client and qemu-io checks the result.
#[test]
fn extended_headers_take_5g_write_zeroes_and_trim_in_one_request() {
    const G: u64 = 1 << 30;
    let dir = scratch();
    let file = tmp_path(&dir, "big.raw");
    let name = path_str(&file).to_owned();
    let runner = Runner::start(&[&format!("file:{name},size=8G")]);
    let uri = runner.uri(&name);
    let trace = qemu_io_traced(
        &uri,
        &[
            "write -P 0xab 1023M 1M", // just before the range
            "write -P 0xcd 6G 1M",    // just after it
            "write -P 0x77 3G 4M",    // inside it
            "write -z -n 1G 5G",      // one 5 GiB WRITE_ZEROES (-n: past 2 GiB)
            "read -P 0xab 1023M 1M",
            "read -P 0 1G 1M",
            "read -P 0 3G 4M",
            "read -P 0 6143M 1M",
            "read -P 0xcd 6G 1M",
            "write -P 0x11 2G 1M",
            "write -P 0x22 5G 1M",
        ],
        5,
    );
    assert!(
        trace.contains("(extended headers), type 1 (ack)"),
        "qemu did not negotiate extended headers:\n{trace}"
    );
    let mut s = negotiate_extended(&runner.addr, &name);
    assert_eq!(extended_call(&mut s, CMD_TRIM, G, 5 * G), (0x5eed, G, 0));
    // Past the end, by a 64-bit length: EINVAL, and the connection goes on.
    assert_eq!(extended_call(&mut s, CMD_TRIM, G, 8 * G).2, EINVAL);
    assert_eq!(extended_call(&mut s, CMD_FLUSH, 0, 0).2, 0);
    qemu_io_traced(
        &uri,
        &[
            "read -P 0 2G 1M",
            "read -P 0 5G 1M",
            "read -P 0xab 1023M 1M",
            "read -P 0xcd 6G 1M",
        ],
        4,
    );
    // The server saw each 5 GiB operation as one request.
    assert_eq!(op_stats(&runner, &name, "write_zeroes"), (1, 5 * G, 0));
    // (The refused one never reached the backend.)
    assert_eq!(op_stats(&runner, &name, "trim"), (1, 5 * G, 0));
    // The file stayed sparse: only the written MiBs are allocated.
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&file).unwrap().blocks() * 512
    };
    assert!(allocated < 64 << 20, "{allocated} bytes allocated");
    // Block status (BLOCK_STATUS_EXT) over the whole 8 GiB: the trimmed
    // range reads as a hole.
    let map = run_ok("qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    let extents: serde_json::Value = serde_json::from_str(&map).expect("qemu-img map json");
    let at = |off: u64| {
        extents
            .as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                s <= off && off < s + l
            })
            .unwrap_or_else(|| panic!("no extent covers {off}: {map}"))
            .clone()
    };
    for off in [2 * G, 3 * G, 5 * G] {
        let e = at(off);
        assert_eq!(
            (&e["zero"], &e["data"]),
            (&true.into(), &false.into()),
            "{e}"
        );
    }
    assert_eq!(at(6 * G)["data"], true, "{map}");
}
