//! Hostile and broken clients (docs/ARCHITECTURE.md, "Hostile input"): each
//! case gets a clear answer or a closed connection, the daemon stays up, and
//! other clients keep working. The protocol decisions behind these are unit
//! tested without sockets in engine/src/protocol/transmission_tests.rs and
//! handshake_tests.rs; these check the daemon end to end.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const ERR_UNSUP: u32 = 0x8000_0001;
const ERR_INVALID: u32 = 0x8000_0003;
const ERR_TOO_BIG: u32 = 0x8000_0009;
const SIZE: u64 = 64 << 20;

fn runner() -> Runner {
    Runner::start(&["mem:disk0,size=64M"])
}

/// Client flags sent, ready for options.
fn options_phase(addr: &str) -> TcpStream {
    let mut s = connect(addr);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

/// Descriptors open once every shard has served a connection (glommio
/// opens some lazily).
fn warm_baseline(r: &Runner) -> usize {
    for _ in 0..4 {
        assert_healthy(&r.addr, "disk0");
    }
    std::thread::sleep(Duration::from_millis(200));
    r.fd_count()
}

/// Waits until the daemon's descriptor count falls back to `baseline`.
fn assert_fds_return(r: &Runner, baseline: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.fd_count() > baseline {
        if Instant::now() > deadline {
            let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", r.pid()))
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|p| p.display().to_string())
                .collect();
            panic!("descriptors leaked: {baseline} at start, now {fds:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn garbage_instead_of_a_handshake_is_dropped() {
    let mut r = runner();
    for seed in 0..8 {
        let mut s = connect(&r.addr);
        let _ = s.write_all(&pattern(8192, seed));
        assert!(closed_by_peer(&mut s), "garbage seed {seed} kept open");
    }
    // Not even the greeting read: bytes straight away.
    let mut s = TcpStream::connect(&r.addr).unwrap();
    let _ = s.write_all(&pattern(100_000, 99));
    assert!(closed_by_peer(&mut s));
    r.assert_alive();
    assert_healthy(&r.addr, "disk0");
}

#[test]
fn huge_option_length_is_refused_without_buffering() {
    let mut r = runner();
    let mut s = options_phase(&r.addr);
    s.write_all(&option_header(OPT_GO, u32::MAX)).unwrap();
    let (opt, kind, _) = read_option_reply(&mut s).expect("no reply to a huge option");
    assert_eq!((opt, kind), (OPT_GO, ERR_TOO_BIG));
    assert!(closed_by_peer(&mut s));
    r.assert_alive();
    assert_healthy(&r.addr, "disk0");
}

#[test]
fn unknown_and_malformed_options_keep_the_stream_in_sync() {
    let r = runner();
    let mut s = options_phase(&r.addr);
    // Unknown option with a body, INFO whose inner name length overruns its
    // option, then a proper GO: the last must still work.
    s.write_all(&option(99, &pattern(1000, 3))).unwrap();
    let mut bad_info = 5000u32.to_be_bytes().to_vec();
    bad_info.extend_from_slice(b"disk0\0\0");
    s.write_all(&option(6, &bad_info)).unwrap();
    s.write_all(&option(OPT_GO, &go_data("disk0"))).unwrap();
    assert_eq!(read_option_reply(&mut s).unwrap().1, ERR_UNSUP);
    assert_eq!(read_option_reply(&mut s).unwrap().1, ERR_INVALID);
    loop {
        let (opt, kind, _) = read_option_reply(&mut s).expect("GO got no answer");
        assert_eq!(opt, OPT_GO);
        assert!(kind < 0x8000_0000, "GO refused: {kind:#x}");
        if kind == 1 {
            break;
        }
    }
    assert_eq!(read_at(&mut s, 0, 512).unwrap(), vec![0u8; 512]);
}

#[test]
fn endless_options_are_cut_off() {
    let mut r = runner();
    let mut s = options_phase(&r.addr);
    let burst: Vec<u8> = (0..300).flat_map(|_| option(99, &[])).collect();
    let _ = s.write_all(&burst);
    let mut answered = 0;
    while let Some((_, kind, _)) = read_option_reply(&mut s) {
        assert_eq!(kind, ERR_UNSUP);
        answered += 1;
    }
    assert!(answered < 300, "all {answered} options answered: no cap");
    r.assert_alive();
    assert_healthy(&r.addr, "disk0");
}

#[test]
fn unknown_export_name_is_refused() {
    let r = runner();
    let mut s = options_phase(&r.addr);
    s.write_all(&option(OPT_GO, &go_data("nope"))).unwrap();
    let (_, kind, _) = read_option_reply(&mut s).unwrap();
    assert_eq!(kind, 0x8000_0006, "want ERR_UNKNOWN");
    // NBD_OPT_EXPORT_NAME has no error reply: the server hangs up.
    s.write_all(&option(1, b"nope")).unwrap();
    assert!(closed_by_peer(&mut s));
}

#[test]
fn write_claiming_gigabytes_is_refused_and_never_buffered() {
    let mut r = runner();
    for len in [u32::MAX, 64 << 20] {
        let mut s = negotiate(&r.addr, "disk0");
        s.write_all(&request(CMD_WRITE, 0, 7, 0, len)).unwrap();
        let (cookie, err) = read_simple_reply(&mut s).expect("no error reply");
        assert_eq!((cookie, err), (7, EINVAL), "len {len}");
        assert!(closed_by_peer(&mut s), "len {len}: connection left open");
    }
    r.assert_alive();
    assert_healthy(&r.addr, "disk0");
}

/// With extended headers a length is 64 bits: a WRITE claiming a TiB is
/// refused and the connection closed, a compact header on an extended
/// session is out of sync and closes, and an effect length past the end
/// is an error the connection survives.
#[test]
fn extended_headers_claiming_terabytes_are_refused() {
    let mut r = runner();
    let mut s = negotiate_extended(&r.addr, "disk0");
    assert_eq!(
        extended_call(&mut s, CMD_WRITE_ZEROES, 0, 1 << 40).2,
        ENOSPC
    );
    assert_eq!(extended_call(&mut s, CMD_TRIM, u64::MAX, 2).2, EINVAL);
    // WRITE with a 1 TiB payload: one error chunk, then hang up unread.
    assert_eq!(extended_call(&mut s, CMD_WRITE, 0, 1 << 40).2, EINVAL);
    assert!(closed_by_peer(&mut s), "connection left open");
    // Compact headers on an extended session: once 32 bytes are in, the
    // magic is wrong and the server hangs up.
    let mut s = negotiate_extended(&r.addr, "disk0");
    let compact = request(CMD_READ, 0, 1, 0, 512);
    s.write_all(&[compact.clone(), compact].concat()).unwrap();
    assert!(
        closed_by_peer(&mut s),
        "compact header accepted on an extended session"
    );
    r.assert_alive();
    assert_healthy(&r.addr, "disk0");
}

#[test]
fn out_of_range_overflowing_and_unknown_requests_get_errors() {
    let r = runner();
    let mut s = negotiate(&r.addr, "disk0");
    let payload = pattern(4096, 9);
    let cases: &[(&str, u16, u16, u64, u32, bool, u32)] = &[
        // name, command, flags, offset, length, carries payload, errno
        ("read past end", CMD_READ, 0, SIZE, 4096, false, EINVAL),
        (
            "read straddling end",
            CMD_READ,
            0,
            SIZE - 1,
            2,
            false,
            EINVAL,
        ),
        (
            "read overflow",
            CMD_READ,
            0,
            u64::MAX - 100,
            4096,
            false,
            EINVAL,
        ),
        ("write past end", CMD_WRITE, 0, SIZE, 4096, true, ENOSPC),
        ("write overflow", CMD_WRITE, 0, u64::MAX, 4096, true, ENOSPC),
        (
            "zeroes past end",
            CMD_WRITE_ZEROES,
            0,
            SIZE - 10,
            4096,
            false,
            ENOSPC,
        ),
        ("trim past end", CMD_TRIM, 0, SIZE, 1, false, EINVAL),
        ("unknown command", 42, 0, 0, 4096, false, EINVAL),
        ("unknown flag", CMD_READ, 1 << 15, 0, 4096, false, EINVAL),
        (
            "DF without structured replies",
            CMD_READ,
            4,
            0,
            4096,
            false,
            EINVAL,
        ),
        (
            "block status never negotiated",
            7,
            0,
            0,
            4096,
            false,
            EINVAL,
        ),
    ];
    for (i, &(name, cmd, flags, offset, len, with_payload, want)) in cases.iter().enumerate() {
        let mut b = request(cmd, flags, i as u64, offset, len);
        if with_payload {
            b.extend_from_slice(&payload);
        }
        s.write_all(&b).unwrap();
        let (cookie, err) = read_simple_reply(&mut s).expect(name);
        assert_eq!((cookie, err), (i as u64, want), "{name}");
    }
    // The refused payloads were skipped, so the stream is still in sync.
    assert_eq!(write_at(&mut s, SIZE - 4096, &payload), 0);
    assert_eq!(read_at(&mut s, SIZE - 4096, 4096).unwrap(), payload);
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let r = runner();
    let mut good = negotiate(&r.addr, "disk0");
    let mut bad = negotiate(&r.addr, "disk0");
    let mut b = request(CMD_READ, 0, 1, 0, 512);
    b[0] ^= 0xff;
    bad.write_all(&b).unwrap();
    assert!(closed_by_peer(&mut bad));
    assert_eq!(read_at(&mut good, 0, 512).unwrap(), vec![0u8; 512]);
}

#[test]
fn clients_vanishing_with_requests_in_flight_hurt_nobody() {
    let mut r = runner();
    let baseline = warm_baseline(&r);
    let mut bystander = negotiate(&r.addr, "disk0");
    let data = pattern(65536, 4);
    assert_eq!(write_at(&mut bystander, 0, &data), 0);

    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let addr = r.addr.clone();
            std::thread::spawn(move || {
                let mut s = negotiate(&addr, "disk0");
                let payload = pattern(65536, t);
                let mut burst = Vec::new();
                for i in 0..64u64 {
                    let off = (1 << 20) + ((t * 64 + i) % 900) * 65536;
                    burst.extend(request(CMD_WRITE, 0, i, off, 65536));
                    burst.extend_from_slice(&payload);
                    burst.extend(request(CMD_READ, 0, 1000 + i, off, 65536));
                }
                if t % 2 == 1 {
                    // End mid-payload.
                    burst.extend(request(CMD_WRITE, 0, 9999, 0, 65536));
                    burst.extend_from_slice(&payload[..1000]);
                }
                let _ = s.write_all(&burst);
                if t % 4 == 0 {
                    // RST rather than FIN.
                    let _ = socket_linger_zero(&s);
                }
                drop(s);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    r.assert_alive();
    assert_eq!(read_at(&mut bystander, 0, 65536).unwrap(), data);
    drop(bystander);
    assert_healthy(&r.addr, "disk0");
    assert_fds_return(&r, baseline);
}

fn socket_linger_zero(s: &TcpStream) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on our own socket with a correctly sized struct.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn connect_disconnect_churn_leaks_nothing() {
    let mut r = runner();
    let baseline = warm_baseline(&r);
    for i in 0..600 {
        match i % 4 {
            0 => drop(TcpStream::connect(&r.addr).unwrap()),
            1 => drop(options_phase(&r.addr)),
            2 => {
                let mut s = negotiate(&r.addr, "disk0");
                let _ = s.write_all(&request(CMD_READ, 0, 1, 0, 4096));
            }
            _ => {
                let mut s = negotiate(&r.addr, "disk0");
                s.write_all(&request(CMD_DISC, 0, 1, 0, 0)).unwrap();
                let _ = s.shutdown(Shutdown::Write);
                assert!(closed_by_peer(&mut s), "DISC did not close");
            }
        }
    }
    r.assert_alive();
    assert_healthy(&r.addr, "disk0");
    assert_fds_return(&r, baseline);
}

/// Resident memory of a process in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
fn a_client_that_never_reads_replies_is_bounded() {
    let mut r = runner();
    let mut s = negotiate(&r.addr, "disk0");
    // 4 GiB of reads requested, replies never read: the runner must stop
    // reading requests once its in-flight bound is reached.
    let burst: Vec<u8> = (0..4096u64)
        .flat_map(|i| request(CMD_READ, 0, i, (i % 60) << 20, 1 << 20))
        .collect();
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = s.write_all(&burst); // times out once TCP pushes back
    std::thread::sleep(Duration::from_millis(500));
    let used = rss(r.pid());
    assert!(
        used < 600 << 20,
        "runner holds {} MiB for one stalled client",
        used >> 20
    );
    // Everyone else is still served.
    assert_healthy(&r.addr, "disk0");
    // And the stalled client's replies are intact once it reads again.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (cookie, err) = read_simple_reply(&mut s).unwrap();
    assert_eq!((cookie, err), (0, 0));
    let mut first = vec![0u8; 1 << 20];
    s.read_exact(&mut first).unwrap();
    r.assert_alive();
}

#[test]
fn stalled_and_dripping_handshakes_are_dropped_at_the_deadline() {
    let mut r = Runner::start_with(&["--handshake-timeout", "1", "--export", "mem:disk0,size=1M"]);
    let started = Instant::now();
    let mut silent = connect(&r.addr);
    // Drips one byte of client flags every 300 ms: never finishes in time.
    let mut drip = connect(&r.addr);
    let dripper = std::thread::spawn(move || {
        // Valid bytes only: client flags, then an option header, one at a time.
        let mut bytes = 3u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&option(99, &[0u8; 64]));
        for b in bytes {
            if drip.write_all(&[b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        closed_by_peer(&mut drip);
        started.elapsed()
    });
    assert!(closed_by_peer(&mut silent), "silent client kept");
    let silent_after = started.elapsed();
    let drip_after = dripper.join().unwrap();
    for (who, t) in [("silent", silent_after), ("dripping", drip_after)] {
        assert!(
            t < Duration::from_secs(3),
            "{who} client dropped only after {t:?}"
        );
    }
    r.assert_alive();
    // A prompt client is unaffected, and the deadline ends with the handshake.
    let mut s = negotiate(&r.addr, "disk0");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(read_at(&mut s, 0, 512).unwrap(), vec![0u8; 512]);
}

/// Pipe descriptors the runner holds.
fn pipe_count(r: &Runner) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", r.pid()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.to_string_lossy().starts_with("pipe:"))
        .count()
}

/// Bytes waiting in a socket's receive queue (FIONREAD).
fn unread(s: &std::net::TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to `n`, which lives across the call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0, "FIONREAD");
    n as usize
}

/// A runner serving a file export of `len` pattern bytes (`seed`), just
/// written and so cached; returns the scratch dir, file, bytes and runner.
fn cached_file_export(
    len: usize,
    seed: u64,
) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>, Runner) {
    let dir = scratch();
    let file = tmp_path(&dir, "disk.raw");
    let data = pattern(len, seed);
    write_file(&file, &data);
    let spec = format!("file:{}", path_str(&file));
    let r = Runner::start(&[&spec]);
    (dir, file, data, r)
}

#[test]
fn cached_file_reads_to_a_client_that_stops_reading_hold_no_shard_and_few_descriptors() {
    // Cached: 1 MiB reads are sent from the page cache.
    let (_dir, file, data, mut r) = cached_file_export(64 << 20, 5);
    let name = path_str(&file);
    let mib = |i: usize| &data[i << 20..(i + 1) << 20];
    for i in 0..4 {
        let mut s = negotiate(&r.addr, name);
        assert!(read_at(&mut s, (i as u64) << 20, 1 << 20).unwrap() == mib(i));
    }
    let (fds, pipes) = (r.fd_count(), pipe_count(&r));
    // Each shard keeps at most 16 pipes, two descriptors each.
    let shards = std::thread::available_parallelism().unwrap().get();
    let bound = 2 * 16 * shards;

    // 4 GiB of reads asked for, no reply ever read.
    let mut stalled = negotiate(&r.addr, name);
    let burst: Vec<u8> = (0..4096u64)
        .flat_map(|i| request(CMD_READ, 0, i, (i % 60) << 20, 1 << 20))
        .collect();
    stalled
        .set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let _ = stalled.write_all(&burst);
    // Replies pile up unread: the first waits in the stalled
    // client's receive queue, and the rest in the runner (as mapped page
    // cache, or in pipes as many as the pool allows and no more).
    let deadline = Instant::now() + Duration::from_secs(10);
    while unread(&stalled) < 64 << 10 {
        assert!(
            Instant::now() < deadline,
            "no replies reached the stalled client"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        pipe_count(&r) <= pipes + bound,
        "pipes beyond the pool bound"
    );
    assert!(
        r.fd_count() <= fds + bound,
        "{} descriptors, {fds} before",
        r.fd_count()
    );
    // Other clients of the export, on either shard, get the right bytes.
    for i in 0..8 {
        let mut s = negotiate(&r.addr, name);
        let got = read_at(&mut s, (i as u64 + 4) << 20, 1 << 20).unwrap();
        assert!(got == mib(i + 4), "a bystander's read {i} differs");
    }
    // The stalled client's first reply is intact once it reads.
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(read_simple_reply(&mut stalled).unwrap(), (0, 0));
    let mut first = vec![0u8; 1 << 20];
    stalled.read_exact(&mut first).unwrap();
    assert!(first == mib(0), "the first reply differs");
    // It vanishes with replies still in pipes, and more like it follow:
    // their pipes are closed or reused, never piled up.
    drop(stalled);
    for round in 0..6u64 {
        let mut s = negotiate(&r.addr, name);
        let burst: Vec<u8> = (0..64u64)
            .flat_map(|i| request(CMD_READ, 0, i, ((i + round) % 60) << 20, 1 << 20))
            .collect();
        s.write_all(&burst).unwrap();
        drop(s);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.fd_count() > fds + bound && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        r.fd_count() <= fds + bound,
        "{} descriptors, {fds} before",
        r.fd_count()
    );
    r.assert_alive();
    let mut s = negotiate(&r.addr, name);
    assert!(read_at(&mut s, 0, 1 << 20).unwrap() == mib(0));
}

/// Someone truncates an export's file under clients reading it from the page
/// cache. The runner must not die of SIGBUS: each read gets zeros, an error,
/// or its connection closed, and once the file is restored it serves it again.
#[test]
fn a_file_truncated_under_cached_reads_never_kills_the_runner() {
    let (_dir, file, data, mut r) = cached_file_export(16 << 20, 9);
    let name = path_str(&file);
    let mut s = negotiate(&r.addr, name);
    assert!(read_at(&mut s, 0, 1 << 20).unwrap() == data[..1 << 20]);
    // Replies in flight while the file shrinks, and reads after it.
    let burst: Vec<u8> = (0..64u64)
        .flat_map(|i| request(CMD_READ, 0, i, (i % 16) << 20, 1 << 20))
        .collect();
    s.write_all(&burst).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(0)
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    drop(s);
    for i in 0..4u64 {
        let mut s = negotiate(&r.addr, name);
        let _ = read_at(&mut s, i << 20, 1 << 20);
    }
    r.assert_alive();
    write_file(&file, &data);
    let mut s = negotiate(&r.addr, name);
    assert!(read_at(&mut s, 3 << 20, 1 << 20).unwrap() == data[3 << 20..4 << 20]);
}
