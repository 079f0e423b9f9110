use super::*;
use crate::protocol::fuzzing::{
    get_u16, get_u32, info_request, meta_request, option_header, parse_replies, Reply,
    TestCatalog as Catalog, DISK_FLAGS, DISK_SIZE, RO_FLAGS, RO_SIZE,
};

fn kinds(replies: &[Reply]) -> Vec<u32> {
    replies.iter().map(|r| r.kind).collect()
}

/// A handshake past the greeting and the client flags.
fn started(client_flags: u32) -> Handshake {
    let mut hs = Handshake::new();
    hs.take_output();
    hs.receive(&client_flags.to_be_bytes(), &Catalog).unwrap();
    assert!(!hs.has_output());
    hs
}

fn fixed() -> Handshake {
    started(CLIENT_FIXED_NEWSTYLE)
}

/// Sends one option (header, then data if the header was accepted) and
/// returns the result and the raw output.
fn send_raw(hs: &mut Handshake, option: u32, data: &[u8]) -> (Result<(), HandshakeError>, Vec<u8>) {
    let result = hs
        .receive(&option_header(option, data.len() as u32), &Catalog)
        .and_then(|()| {
            assert_eq!(hs.want(), data.len());
            hs.receive(data, &Catalog)
        });
    (result, hs.take_output())
}

/// Sends one option that must not end the handshake; returns its replies,
/// all of which must echo the option.
fn send(hs: &mut Handshake, option: u32, data: &[u8]) -> Vec<Reply> {
    let (result, out) = send_raw(hs, option, data);
    assert_eq!(result, Ok(()), "option {option}");
    let replies = parse_replies(&out);
    assert!(replies.iter().all(|r| r.option == option), "{replies:?}");
    replies
}

/// Sends an option that must be refused with exactly one error reply, and
/// checks that the handshake is still waiting for the next option.
fn send_refused(hs: &mut Handshake, option: u32, data: &[u8], error: u32) {
    let replies = send(hs, option, data);
    assert_eq!(kinds(&replies), [error], "option {option} data {data:02x?}");
    assert!(!hs.is_done() && !hs.is_closed());
    assert_eq!(hs.want(), 16);
}

/// GO on `name`, which must succeed; returns what was negotiated.
fn go(hs: &mut Handshake, name: &str) -> Negotiated {
    let replies = send(hs, OPT_GO, &info_request(name.as_bytes(), &[]));
    assert_eq!(replies.last().map(|r| r.kind), Some(REP_ACK), "{replies:?}");
    assert!(hs.is_done());
    hs.negotiated().unwrap().clone()
}

fn structured() -> Handshake {
    let mut hs = fixed();
    assert_eq!(kinds(&send(&mut hs, OPT_STRUCTURED_REPLY, &[])), [REP_ACK]);
    hs
}

#[test]
fn greeting_is_fixed_newstyle_with_no_zeroes() {
    let mut hs = Handshake::new();
    assert!(hs.has_output());
    let mut want = b"NBDMAGICIHAVEOPT".to_vec();
    want.extend_from_slice(&[0, 3]);
    assert_eq!(hs.take_output(), want);
    assert!(!hs.has_output());
    assert_eq!(hs.want(), 4);
    assert!(!hs.is_done() && !hs.is_closed() && hs.negotiated().is_none());
}

#[test]
fn client_flags() {
    use HandshakeError::*;
    let table: &[(u32, Result<bool, HandshakeError>)] = &[
        (CLIENT_FIXED_NEWSTYLE, Ok(false)),
        (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES, Ok(true)),
        (0, Err(NotFixedNewstyle)),
        (CLIENT_NO_ZEROES, Err(NotFixedNewstyle)),
        (CLIENT_FIXED_NEWSTYLE | 4, Err(BadClientFlags(5))),
        (1 << 31 | 3, Err(BadClientFlags(1 << 31 | 3))),
        (u32::MAX, Err(BadClientFlags(u32::MAX))),
    ];
    for (flags, want) in table {
        let mut hs = Handshake::new();
        hs.take_output();
        let got = hs.receive(&flags.to_be_bytes(), &Catalog);
        match want {
            Ok(no_zeroes) => {
                assert_eq!(got, Ok(()), "flags {flags:#x}");
                assert_eq!(hs.want(), 16);
                // NO_ZEROES shows in the negotiated result.
                assert_eq!(
                    go(&mut hs, "disk").no_zeroes,
                    *no_zeroes,
                    "flags {flags:#x}"
                );
            }
            Err(e) => {
                assert_eq!(got.as_ref(), Err(e), "flags {flags:#x}");
                assert!(hs.is_closed() && !hs.has_output());
                assert_eq!(hs.want(), 0);
            }
        }
    }
}

#[test]
fn export_name_found_sends_size_flags_and_maybe_zeroes() {
    let table = [
        (CLIENT_FIXED_NEWSTYLE, "disk", DISK_SIZE, DISK_FLAGS, 124),
        (
            CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES,
            "disk",
            DISK_SIZE,
            DISK_FLAGS,
            0,
        ),
        (CLIENT_FIXED_NEWSTYLE, "", DISK_SIZE, DISK_FLAGS, 124),
        (
            CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES,
            "ro",
            RO_SIZE,
            RO_FLAGS,
            0,
        ),
    ];
    for (client_flags, name, size, flags, zeroes) in table {
        let mut hs = started(client_flags);
        let (result, out) = send_raw(&mut hs, OPT_EXPORT_NAME, name.as_bytes());
        assert_eq!(result, Ok(()));
        let mut want = size.to_be_bytes().to_vec();
        want.extend_from_slice(&flags.to_be_bytes());
        want.resize(10 + zeroes, 0);
        assert_eq!(out, want, "{name:?} flags {client_flags}");
        assert!(hs.is_done() && !hs.is_closed());
        assert_eq!(hs.want(), 0);
        let n = hs.negotiated().unwrap();
        assert_eq!(n.export, Catalog.lookup(name).unwrap());
        assert_eq!(n.no_zeroes, zeroes == 0);
        assert!(!n.structured_replies && n.base_allocation.is_none());
    }
}

#[test]
fn export_name_unknown_or_too_long_hangs_up() {
    let long = "d".repeat(MAX_STRING + 1);
    for name in ["nope", "DISK", long.as_str()] {
        let mut hs = fixed();
        let (result, out) = send_raw(&mut hs, OPT_EXPORT_NAME, name.as_bytes());
        assert_eq!(result, Err(HandshakeError::UnknownExport(name.into())));
        assert!(out.is_empty(), "EXPORT_NAME has no error reply");
        assert!(hs.is_closed() && hs.negotiated().is_none());
    }
}

#[test]
fn info_and_go_reply_with_requested_information() {
    let asked = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 0x7777];
    for option in [OPT_INFO, OPT_GO] {
        let mut hs = fixed();
        let replies = send(&mut hs, option, &info_request(b"", &asked));
        let types: Vec<u16> = replies[..replies.len() - 1]
            .iter()
            .map(Reply::info_type)
            .collect();
        assert_eq!(
            types,
            [INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
            "unknown info requests are ignored"
        );
        assert_eq!(replies.last().unwrap().kind, REP_ACK);
        assert!(replies.last().unwrap().body.is_empty());

        let mut export = INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&DISK_SIZE.to_be_bytes());
        export.extend_from_slice(&DISK_FLAGS.to_be_bytes());
        assert_eq!(replies[0].body, export);
        assert_eq!(
            replies[1].body[2..],
            *b"disk",
            "canonical name of the default"
        );
        assert_eq!(replies[2].body[2..], *b"the test disk");
        let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [1u32, 4096, 32 << 20] {
            sizes.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(replies[3].body, sizes);

        // INFO leaves the handshake open; GO ends it.
        assert_eq!(hs.is_done(), option == OPT_GO);
        if option == OPT_INFO {
            assert_eq!(hs.want(), 16);
            assert!(hs.negotiated().is_none());
            assert_eq!(go(&mut hs, "disk").export.name, "disk");
        } else {
            assert_eq!(hs.negotiated().unwrap().export, Catalog.lookup("").unwrap());
            assert_eq!(
                hs.receive(&[0; 16], &Catalog),
                Err(HandshakeError::Finished)
            );
        }
    }
}

#[test]
fn info_always_sends_export_and_block_size_and_skips_empty_description() {
    let mut hs = fixed();
    let replies = send(&mut hs, OPT_INFO, &info_request(b"ro", &[INFO_DESCRIPTION]));
    let types: Vec<u16> = replies[..replies.len() - 1]
        .iter()
        .map(Reply::info_type)
        .collect();
    assert_eq!(types, [INFO_EXPORT, INFO_BLOCK_SIZE]);
    assert_eq!(get_u32(&replies[1].body, 2), 512);
}

#[test]
fn info_and_go_on_unknown_export_fail_and_continue() {
    for option in [OPT_INFO, OPT_GO] {
        let mut hs = fixed();
        send_refused(
            &mut hs,
            option,
            &info_request(b"nope", &[INFO_NAME]),
            REP_ERR_UNKNOWN,
        );
        assert_eq!(go(&mut hs, "ro").export.name, "ro");
    }
}

#[test]
fn malformed_info_and_go_get_invalid_and_continue() {
    let long_name = vec![b'x'; MAX_STRING + 1];
    let mut trailing = info_request(b"disk", &[INFO_NAME]);
    trailing.push(0);
    let mut short_count = info_request(b"disk", &[INFO_NAME]);
    short_count[9] = 2;
    let mut name_overrun = info_request(b"disk", &[]);
    name_overrun[3] = 5;
    let mut huge_name_len = info_request(b"disk", &[]);
    huge_name_len[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    let cases: &[(&str, Vec<u8>)] = &[
        ("empty", vec![]),
        ("shorter than the fixed fields", vec![0, 0, 0, 0, 0]),
        ("trailing byte", trailing),
        ("count larger than the list", short_count),
        ("name longer than the data", name_overrun),
        ("name length u32::MAX", huge_name_len),
        ("name longer than MAX_STRING", info_request(&long_name, &[])),
        ("name not UTF-8", info_request(b"\xff\xfe", &[])),
    ];
    for option in [OPT_INFO, OPT_GO] {
        let mut hs = fixed();
        for (what, data) in cases {
            println!("{option} {what}");
            send_refused(&mut hs, option, data, REP_ERR_INVALID);
        }
        go(&mut hs, "disk");
    }
}

#[test]
fn list_names_every_export() {
    let mut hs = fixed();
    let replies = send(&mut hs, OPT_LIST, &[]);
    assert_eq!(kinds(&replies), [REP_SERVER, REP_SERVER, REP_ACK]);
    for (reply, name) in replies.iter().zip(["disk", "ro"]) {
        let mut body = (name.len() as u32).to_be_bytes().to_vec();
        body.extend_from_slice(name.as_bytes());
        assert_eq!(reply.body, body);
    }
    send_refused(&mut hs, OPT_LIST, b"x", REP_ERR_INVALID);
    go(&mut hs, "disk");
}

#[test]
fn abort_acks_then_closes_even_with_data() {
    for data in [&b""[..], b"ignored"] {
        let mut hs = fixed();
        let (result, out) = send_raw(&mut hs, OPT_ABORT, data);
        assert_eq!(result, Err(HandshakeError::Aborted));
        let replies = parse_replies(&out);
        assert_eq!(
            replies,
            [Reply {
                option: OPT_ABORT,
                kind: REP_ACK,
                body: vec![]
            }]
        );
        assert!(hs.is_closed() && hs.negotiated().is_none());
        assert_eq!(hs.receive(&[], &Catalog), Err(HandshakeError::Finished));
    }
}

#[test]
fn structured_reply_negotiation() {
    let mut hs = fixed();
    send_refused(&mut hs, OPT_STRUCTURED_REPLY, b"x", REP_ERR_INVALID);
    assert!(
        !go(&mut hs, "disk").structured_replies,
        "refused option must not count"
    );

    let mut hs = structured();
    let n = go(&mut hs, "disk");
    assert!(n.structured_replies && n.base_allocation.is_none());
}

/// LIST_META_CONTEXT answers with base:allocation (id 0, reserved) for
/// these queries, with or without structured replies.
#[test]
fn list_meta_context_queries() {
    let table: &[(&[&[u8]], bool)] = &[
        (&[], true),
        (&[b"base:allocation"], true),
        (&[b"base:"], true),
        (&[b"qemu:dirty-bitmap:x", b"base:"], true),
        (&[b"base:nothing"], false),
        (&[b"qemu:dirty-bitmap:x"], false),
        (&[b"base:Allocation"], false),
    ];
    for start in [fixed as fn() -> Handshake, structured] {
        let mut hs = start();
        for &(queries, listed) in table {
            let replies = send(
                &mut hs,
                OPT_LIST_META_CONTEXT,
                &meta_request(b"disk", queries),
            );
            let mut want = vec![];
            if listed {
                let mut body = 0u32.to_be_bytes().to_vec();
                body.extend_from_slice(b"base:allocation");
                want.push(Reply {
                    option: OPT_LIST_META_CONTEXT,
                    kind: REP_META_CONTEXT,
                    body,
                });
            }
            want.push(Reply {
                option: OPT_LIST_META_CONTEXT,
                kind: REP_ACK,
                body: vec![],
            });
            assert_eq!(replies, want, "queries {queries:?}");
        }
        // Listing selects nothing.
        assert_eq!(go(&mut hs, "disk").base_allocation, None);
    }
}

/// SET on this export with these queries, then GO there: the selected id.
type SetCase<'a> = (&'a str, &'a [&'a [u8]], &'a str, Option<u32>);

/// SET_META_CONTEXT selects base:allocation only when asked by its full
/// name ("base:" must be ignored by SET), and only for the export it named.
#[test]
fn set_meta_context_selection() {
    let table: &[SetCase] = &[
        (
            "disk",
            &[b"base:allocation"],
            "disk",
            Some(META_ID_BASE_ALLOCATION),
        ),
        (
            "disk",
            &[b"x-foo:bar", b"base:allocation"],
            "",
            Some(META_ID_BASE_ALLOCATION),
        ),
        (
            "",
            &[b"base:allocation"],
            "disk",
            Some(META_ID_BASE_ALLOCATION),
        ),
        ("disk", &[b"base:"], "disk", None),
        ("disk", &[], "disk", None),
        ("disk", &[b"qemu:dirty-bitmap:x"], "disk", None),
        ("ro", &[b"base:allocation"], "disk", None),
        ("disk", &[b"base:allocation"], "ro", None),
    ];
    for &(set_on, queries, go_on, selected) in table {
        let mut hs = structured();
        let replies = send(
            &mut hs,
            OPT_SET_META_CONTEXT,
            &meta_request(set_on.as_bytes(), queries),
        );
        let mut want = vec![];
        let answered = queries.contains(&&b"base:allocation"[..]);
        if answered {
            let mut body = META_ID_BASE_ALLOCATION.to_be_bytes().to_vec();
            body.extend_from_slice(b"base:allocation");
            want.push(REP_META_CONTEXT);
            assert_eq!(replies[0].body, body);
        }
        want.push(REP_ACK);
        assert_eq!(kinds(&replies), want, "SET {set_on:?} {queries:?}");
        let n = go(&mut hs, go_on);
        assert_eq!(
            n.base_allocation, selected,
            "SET {set_on:?} {queries:?}, GO {go_on:?}"
        );
    }
}

#[test]
fn set_meta_context_needs_structured_replies() {
    let mut hs = fixed();
    let set = meta_request(b"disk", &[b"base:allocation"]);
    send_refused(&mut hs, OPT_SET_META_CONTEXT, &set, REP_ERR_INVALID);
    // Structured replies after a refused SET do not revive it.
    send(&mut hs, OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(go(&mut hs, "disk").base_allocation, None);
}

/// A failed SET replaces the earlier selection too (spec: "including when
/// this command fails").
#[test]
fn failed_set_meta_context_clears_the_selection() {
    let good = meta_request(b"disk", &[b"base:allocation"]);
    let failures: &[(Vec<u8>, u32)] = &[
        (
            meta_request(b"nope", &[b"base:allocation"]),
            REP_ERR_UNKNOWN,
        ),
        (vec![0; 3], REP_ERR_INVALID),
    ];
    for (bad, error) in failures {
        let mut hs = structured();
        send(&mut hs, OPT_SET_META_CONTEXT, &good);
        send_refused(&mut hs, OPT_SET_META_CONTEXT, bad, *error);
        assert_eq!(go(&mut hs, "disk").base_allocation, None);
    }
}

#[test]
fn meta_context_errors_continue() {
    let mut trailing = meta_request(b"disk", &[b"base:"]);
    trailing.push(0);
    let mut query_overrun = meta_request(b"disk", &[b"base:"]);
    let at = query_overrun.len() - 6;
    query_overrun[at] = 9;
    let mut missing_query = meta_request(b"disk", &[b"base:"]);
    missing_query[11] = 2;
    let mut name_overrun = meta_request(b"disk", &[]);
    name_overrun[3] = 200;
    let many: Vec<&[u8]> = vec![b"base:"; 129];
    let long_query = vec![b'q'; MAX_STRING + 1];
    let cases: &[(&str, Vec<u8>, u32)] = &[
        (
            "unknown export",
            meta_request(b"nope", &[b"base:"]),
            REP_ERR_UNKNOWN,
        ),
        ("empty", vec![], REP_ERR_INVALID),
        ("shorter than the fixed fields", vec![0; 7], REP_ERR_INVALID),
        ("trailing byte", trailing, REP_ERR_INVALID),
        ("query longer than the data", query_overrun, REP_ERR_INVALID),
        ("count larger than the list", missing_query, REP_ERR_INVALID),
        ("name longer than the data", name_overrun, REP_ERR_INVALID),
        (
            "too many queries",
            meta_request(b"disk", &many),
            REP_ERR_INVALID,
        ),
        (
            "query longer than MAX_STRING",
            meta_request(b"disk", &[&long_query]),
            REP_ERR_INVALID,
        ),
        (
            "query not UTF-8",
            meta_request(b"disk", &[b"base:\xff"]),
            REP_ERR_INVALID,
        ),
    ];
    for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        let mut hs = structured();
        for (what, data, error) in cases {
            println!("{option} {what}");
            send_refused(&mut hs, option, data, *error);
        }
        go(&mut hs, "disk");
    }
}

#[test]
fn unsupported_options_get_unsup_and_stay_in_sync() {
    let mut hs = fixed();
    // The withdrawn PEEK_EXPORT and made-up ones.
    let options = [4, 0, 12, 0x1234_5678, u32::MAX];
    for option in options {
        // The payload looks like an option header: it must be skipped, not parsed.
        send_refused(&mut hs, option, &option_header(OPT_GO, 0), REP_ERR_UNSUP);
    }
    // Without TLS configured, STARTTLS is refused by policy (NOTLS mode).
    send_refused(
        &mut hs,
        OPT_STARTTLS,
        &option_header(OPT_GO, 0),
        REP_ERR_POLICY,
    );
    send_refused(&mut hs, OPT_STARTTLS, &[], REP_ERR_POLICY);
    assert!(!hs.take_starttls());
    go(&mut hs, "disk");
}

#[test]
fn zero_length_option_still_needs_a_receive() {
    let mut hs = fixed();
    hs.receive(&option_header(OPT_STRUCTURED_REPLY, 0), &Catalog)
        .unwrap();
    assert_eq!(hs.want(), 0);
    assert!(!hs.is_done() && !hs.is_closed() && !hs.has_output());
    hs.receive(&[], &Catalog).unwrap();
    assert_eq!(hs.want(), 16);
    assert!(hs.has_output());
}

#[test]
fn option_length_limit() {
    // The largest allowed option is read (and skipped) in full.
    let mut hs = fixed();
    send_refused(
        &mut hs,
        0x99,
        &vec![0; MAX_OPTION_LEN as usize],
        REP_ERR_UNSUP,
    );
    go(&mut hs, "disk");

    // One more byte is refused before any data is read, then the handshake closes.
    for option in [OPT_GO, OPT_LIST, 0x99] {
        let mut hs = fixed();
        let got = hs.receive(&option_header(option, MAX_OPTION_LEN + 1), &Catalog);
        assert_eq!(got, Err(HandshakeError::OptionTooBig(MAX_OPTION_LEN + 1)));
        assert!(hs.is_closed());
        assert_eq!(kinds(&parse_replies(&hs.take_output())), [REP_ERR_TOO_BIG]);
    }
    // EXPORT_NAME cannot take an option reply: just hang up.
    let mut hs = fixed();
    let got = hs.receive(&option_header(OPT_EXPORT_NAME, u32::MAX), &Catalog);
    assert_eq!(got, Err(HandshakeError::OptionTooBig(u32::MAX)));
    assert!(hs.is_closed() && !hs.has_output());
}

#[test]
fn option_count_limit() {
    let mut hs = fixed();
    for _ in 0..MAX_OPTIONS - 1 {
        send(&mut hs, OPT_STRUCTURED_REPLY, &[]);
    }
    // The last allowed option can still finish the handshake...
    let mut last = fixed();
    for _ in 0..MAX_OPTIONS - 1 {
        send(&mut last, OPT_LIST, &[]);
    }
    go(&mut last, "disk");
    // ...and one more is refused and closes.
    send(&mut hs, OPT_STRUCTURED_REPLY, &[]);
    let (result, out) = send_raw(&mut hs, OPT_GO, &info_request(b"disk", &[]));
    assert_eq!(result, Err(HandshakeError::TooManyOptions));
    assert!(out.is_empty() && hs.is_closed());
}

#[test]
fn bad_option_magic_closes() {
    let mut hs = fixed();
    let mut header = option_header(OPT_GO, 0);
    header[7] ^= 1;
    let got = hs.receive(&header, &Catalog);
    assert_eq!(got, Err(HandshakeError::BadOptionMagic(IHAVEOPT ^ 1)));
    assert!(hs.is_closed() && !hs.has_output());
    assert_eq!(hs.want(), 0);
}

#[test]
fn shutdown_refuses_every_option_but_abort() {
    let mut hs = structured();
    hs.begin_shutdown();
    let refused: &[(u32, Vec<u8>)] = &[
        (OPT_GO, info_request(b"disk", &[])),
        (OPT_INFO, info_request(b"disk", &[])),
        (OPT_LIST, vec![]),
        (OPT_STRUCTURED_REPLY, vec![]),
        (
            OPT_SET_META_CONTEXT,
            meta_request(b"disk", &[b"base:allocation"]),
        ),
        (OPT_LIST_META_CONTEXT, meta_request(b"disk", &[])),
        (OPT_STARTTLS, vec![]),
        (0x99, vec![1, 2, 3]),
    ];
    for (option, data) in refused {
        send_refused(&mut hs, *option, data, REP_ERR_SHUTDOWN);
    }
    let (result, out) = send_raw(&mut hs, OPT_ABORT, &[]);
    assert_eq!(result, Err(HandshakeError::Aborted));
    assert_eq!(kinds(&parse_replies(&out)), [REP_ACK]);

    // EXPORT_NAME has no error reply: hang up without writing anything.
    let mut hs = fixed();
    hs.begin_shutdown();
    let (result, out) = send_raw(&mut hs, OPT_EXPORT_NAME, b"disk");
    assert_eq!(result, Err(HandshakeError::ShuttingDown));
    assert!(out.is_empty() && hs.is_closed() && hs.negotiated().is_none());
}

#[test]
fn wrong_input_size_is_refused_without_changing_state() {
    let mut hs = Handshake::new();
    let got = hs.receive(&[0, 0, 0, 1, 0], &Catalog);
    assert_eq!(got, Err(HandshakeError::WrongInput { want: 4, got: 5 }));
    assert_eq!(hs.want(), 4);
    let mut hs = fixed();
    let got = hs.receive(&option_header(OPT_LIST, 0)[..15], &Catalog);
    assert_eq!(got, Err(HandshakeError::WrongInput { want: 16, got: 15 }));
    hs.receive(&option_header(OPT_GO, 6), &Catalog).unwrap();
    let got = hs.receive(&[0; 7], &Catalog);
    assert_eq!(got, Err(HandshakeError::WrongInput { want: 6, got: 7 }));
    hs.receive(&info_request(b"", &[]), &Catalog).unwrap();
    assert!(hs.is_done());
}

#[test]
fn receive_after_done_or_closed_is_finished() {
    let mut done = fixed();
    go(&mut done, "disk");
    let mut closed = started(CLIENT_FIXED_NEWSTYLE);
    let _ = closed.receive(&[0; 16], &Catalog);
    for hs in [&mut done, &mut closed] {
        for input in [&[][..], &[0u8; 4][..], &[0u8; 16][..]] {
            assert_eq!(hs.receive(input, &Catalog), Err(HandshakeError::Finished));
        }
        assert_eq!(hs.want(), 0);
        assert!(!hs.has_output());
    }
    assert!(done.is_done() && !done.is_closed());
    assert!(closed.is_closed() && !closed.is_done());
}

fn extended() -> Handshake {
    let mut hs = fixed();
    assert_eq!(kinds(&send(&mut hs, OPT_EXTENDED_HEADERS, &[])), [REP_ACK]);
    hs
}

#[test]
fn extended_headers_imply_structured_replies_and_payload_block_status() {
    let mut hs = extended();
    // base:allocation needs no separate STRUCTURED_REPLY.
    let replies = send(
        &mut hs,
        OPT_SET_META_CONTEXT,
        &meta_request(b"disk", &[META_BASE_ALLOCATION.as_bytes()]),
    );
    assert_eq!(kinds(&replies), [REP_META_CONTEXT, REP_ACK]);
    let n = go(&mut hs, "disk");
    assert_eq!(n.headers, HeaderMode::Extended);
    assert!(n.structured_replies);
    assert_eq!(n.base_allocation, Some(META_ID_BASE_ALLOCATION));
    assert_eq!(n.export.flags, DISK_FLAGS | TF_BLOCK_STATUS_PAYLOAD);
}

#[test]
fn extended_headers_info_advertises_block_status_payload() {
    let mut hs = extended();
    let replies = send(&mut hs, OPT_INFO, &info_request(b"disk", &[]));
    assert_eq!(replies[0].info_type(), INFO_EXPORT);
    assert_eq!(
        get_u16(&replies[0].body, 10),
        DISK_FLAGS | TF_BLOCK_STATUS_PAYLOAD
    );
    // Compact sessions never see the flag.
    let mut hs = structured();
    let replies = send(&mut hs, OPT_INFO, &info_request(b"disk", &[]));
    assert_eq!(get_u16(&replies[0].body, 10), DISK_FLAGS);
}

#[test]
fn extended_headers_refusals() {
    let mut hs = fixed();
    send_refused(&mut hs, OPT_EXTENDED_HEADERS, &[1], REP_ERR_INVALID);
    let mut hs = extended();
    // Asking again is harmless; downgrading is not possible.
    assert_eq!(kinds(&send(&mut hs, OPT_EXTENDED_HEADERS, &[])), [REP_ACK]);
    send_refused(&mut hs, OPT_STRUCTURED_REPLY, &[], REP_ERR_EXT_HEADER_REQD);
    // EXPORT_NAME is forbidden once extended headers are on: hang up.
    let (result, out) = send_raw(&mut hs, OPT_EXPORT_NAME, b"disk");
    assert_eq!(result, Err(HandshakeError::ExportNameAfterExtended));
    assert!(out.is_empty() && hs.is_closed());
    // Structured first, then extended: extended wins.
    let mut hs = structured();
    assert_eq!(kinds(&send(&mut hs, OPT_EXTENDED_HEADERS, &[])), [REP_ACK]);
    assert_eq!(go(&mut hs, "disk").headers, HeaderMode::Extended);
    // Without asking, compact.
    assert_eq!(go(&mut fixed(), "disk").headers, HeaderMode::Compact);
}

#[test]
fn list_can_be_turned_off_and_then_reveals_nothing() {
    let mut hs = Handshake::new().list_exports(false);
    hs.take_output();
    hs.receive(&CLIENT_FIXED_NEWSTYLE.to_be_bytes(), &Catalog)
        .unwrap();
    let replies = send(&mut hs, OPT_LIST, &[]);
    assert_eq!(kinds(&replies), [REP_ERR_POLICY]);
    let text = String::from_utf8_lossy(&replies[0].body);
    assert!(!text.contains("disk") && !text.contains("ro"), "{text}");
    // Everything else still works: a client that knows the name connects.
    assert_eq!(go(&mut hs, "disk").export.name, "disk");
}

fn with_tls(policy: TlsPolicy) -> Handshake {
    let mut hs = Handshake::new().tls(policy);
    hs.take_output();
    hs.receive(&CLIENT_FIXED_NEWSTYLE.to_be_bytes(), &Catalog)
        .unwrap();
    hs
}

/// STARTTLS that must be accepted: one ACK, and the driver is told to
/// upgrade exactly once.
fn starttls(hs: &mut Handshake) {
    assert_eq!(kinds(&send(hs, OPT_STARTTLS, &[])), [REP_ACK]);
    assert!(hs.take_starttls() && !hs.take_starttls());
    assert!(hs.tls_active());
}

#[test]
fn require_tls_refuses_everything_but_starttls_and_abort_and_reveals_nothing() {
    let mut hs = with_tls(TlsPolicy::Require);
    for (option, data) in [
        (OPT_LIST, vec![]),
        (OPT_INFO, info_request(b"disk", &[])),
        (OPT_GO, info_request(b"disk", &[])),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_EXTENDED_HEADERS, vec![]),
        (
            OPT_LIST_META_CONTEXT,
            meta_request(b"disk", &[b"base:allocation"]),
        ),
        (0x1234, vec![1, 2, 3]),
    ] {
        let replies = send(&mut hs, option, &data);
        assert_eq!(kinds(&replies), [REP_ERR_TLS_REQD], "option {option}");
        let text = String::from_utf8_lossy(&replies[0].body);
        assert!(!text.contains("disk"), "{text}");
    }
    // EXPORT_NAME cannot be refused with a reply: the server hangs up.
    let (result, out) = send_raw(&mut hs, OPT_EXPORT_NAME, b"disk");
    assert_eq!(result, Err(HandshakeError::TlsRequired));
    assert!(out.is_empty() && hs.is_closed());
    // ABORT still works before TLS.
    let mut hs = with_tls(TlsPolicy::Require);
    let (result, _) = send_raw(&mut hs, OPT_ABORT, &[]);
    assert_eq!(result, Err(HandshakeError::Aborted));
}

#[test]
fn starttls_upgrades_once_and_forgets_what_was_negotiated_in_the_clear() {
    let mut hs = with_tls(TlsPolicy::On);
    // Plain options work in `On` mode, but do not survive the upgrade.
    assert_eq!(kinds(&send(&mut hs, OPT_STRUCTURED_REPLY, &[])), [REP_ACK]);
    let replies = send(
        &mut hs,
        OPT_SET_META_CONTEXT,
        &meta_request(b"disk", &[b"base:allocation"]),
    );
    assert_eq!(kinds(&replies), [REP_META_CONTEXT, REP_ACK]);
    // STARTTLS with data is invalid and changes nothing.
    send_refused(&mut hs, OPT_STARTTLS, &[0], REP_ERR_INVALID);
    assert!(!hs.take_starttls() && !hs.tls_active());
    starttls(&mut hs);
    // A second STARTTLS inside TLS is invalid.
    send_refused(&mut hs, OPT_STARTTLS, &[], REP_ERR_INVALID);
    assert!(!hs.take_starttls());
    let n = go(&mut hs, "disk");
    assert!(
        !n.structured_replies && n.base_allocation.is_none(),
        "{n:?}"
    );
    assert_eq!(n.headers, HeaderMode::Compact);
}

#[test]
fn after_tls_a_require_server_answers_normally() {
    let mut hs = with_tls(TlsPolicy::Require);
    starttls(&mut hs);
    assert_eq!(kinds(&send(&mut hs, OPT_STRUCTURED_REPLY, &[])), [REP_ACK]);
    let replies = send(&mut hs, OPT_INFO, &info_request(b"disk", &[]));
    assert_eq!(replies.last().map(|r| r.kind), Some(REP_ACK));
    assert!(go(&mut hs, "disk").structured_replies);
    // And EXPORT_NAME over TLS is fine.
    let mut hs = with_tls(TlsPolicy::Require);
    starttls(&mut hs);
    let (result, out) = send_raw(&mut hs, OPT_EXPORT_NAME, b"disk");
    assert_eq!(result, Ok(()));
    assert!(!out.is_empty() && hs.is_done());
}

#[test]
fn repeated_info_requests_are_answered_once_each() {
    // A 64 KiB option repeating NAME and DESCRIPTION: the answer stays small.
    let mut hs = fixed();
    let infos: Vec<u16> = (0..30_000)
        .map(|i| {
            if i % 2 == 0 {
                INFO_NAME
            } else {
                INFO_DESCRIPTION
            }
        })
        .collect();
    let (result, out) = send_raw(&mut hs, OPT_INFO, &info_request(b"disk", &infos));
    assert_eq!(result, Ok(()));
    assert!(out.len() < 1024, "{} bytes of replies", out.len());
    let names = parse_replies(&out)
        .iter()
        .filter(|r| r.kind == REP_INFO && r.info_type() == INFO_NAME)
        .count();
    assert_eq!(names, 1);
}
