//! Fuzz drivers for what a stranger can send the control plane: the hello
//! and the request frames of the control route, and the state file the
//! runner loads at start. Built under `--cfg fuzzing` (cargo-fuzz sets it)
//! for the targets in `fuzz/`, and under test, where seeded smoke runs
//! drive the same code in CI.
//!
//! The rules asserted: nothing panics or allocates past the frame limit;
//! whatever decodes re-encodes to something that decodes to the same
//! value; a loaded state file holds only valid, distinct keys and survives
//! a save and a restart.

use crate::model::State;
use crate::saveconfig::{PersistError, SaveConfig};
use crate::wire::{read_frame, write_frame, Hello, HelloReply, Request, WireError, MAX_FRAME};
use std::path::Path;

/// What a driven control stream came to.
#[derive(Debug, Default)]
pub struct ControlOutcome {
    pub hello: bool,
    pub requests: usize,
}

/// Byte 0 picks the side: even, the server reading a client (a hello, then
/// request frames until the stream fails); odd, the client reading a
/// runner's hello reply. The rest is the stream.
pub fn drive_control(data: &[u8]) -> ControlOutcome {
    let Some((&side, mut rest)) = data.split_first() else {
        return ControlOutcome::default();
    };
    let mut outcome = ControlOutcome::default();
    if side & 1 == 1 {
        if let Ok(reply) = HelloReply::read_from(&mut rest) {
            let again = HelloReply::read_from(&mut &reply.encode()[..]).expect("re-read");
            assert_eq!(again, reply);
            outcome.hello = true;
        }
        return outcome;
    }
    let Ok(hello) = Hello::read_from(&mut rest) else {
        return outcome;
    };
    assert_eq!(
        Hello::read_from(&mut &hello.encode()[..]).expect("re-read"),
        hello
    );
    outcome.hello = true;
    loop {
        let before = rest.len();
        match read_frame::<_, Request>(&mut rest) {
            Ok(request) => {
                let mut out = Vec::new();
                write_frame(&mut out, &request).expect("a decoded request re-encodes");
                assert!(out.len() <= before, "re-encoding grew past the input");
                let again: Request = read_frame(&mut &out[..]).expect("re-read");
                assert_eq!(again, request);
                outcome.requests += 1;
            }
            // An undecodable frame was consumed whole: the stream is in sync.
            Err(WireError::Decode(_)) => {}
            Err(WireError::FrameTooBig(n)) => {
                assert!(n > MAX_FRAME);
                return outcome;
            }
            Err(_) => return outcome,
        }
    }
}

/// The state file loader on `data`; Some when it loaded.
pub fn drive_state(data: &[u8]) -> Option<SaveConfig> {
    let path = Path::new("/fuzz/saveconfig.json");
    let cfg = match SaveConfig::parse(data, path) {
        Ok(cfg) => cfg,
        Err(PersistError::Corrupt { .. } | PersistError::Schema { .. }) => return None,
        Err(e) => panic!("the parser failed another way: {e}"),
    };
    let mut keys = std::collections::HashSet::new();
    for b in &cfg.backstores {
        assert!(b.handler.check_key(&b.key).is_ok(), "{b:?}");
        assert!(keys.insert(b.key.clone()), "{b:?}");
    }
    // A save writes what a later start reads back.
    let text = serde_json::to_vec_pretty(&cfg).expect("serialise");
    assert_eq!(SaveConfig::parse(&text, path).expect("reload"), cfg);
    let restarted = cfg.clone().after_restart();
    for b in &restarted.backstores {
        assert!(b.state != State::Mapping, "{b:?}");
    }
    Some(cfg)
}

#[cfg(test)]
mod smoke {
    use super::*;
    use crate::model::{Handler, ListFilter};
    use crate::wire::{CreateRequest, PROTOCOL_VERSION};

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Flips, drops or inserts a few bytes of `good`.
    fn mutate(rng: &mut Rng, good: &[u8]) -> Vec<u8> {
        let mut d = good.to_vec();
        for _ in 0..rng.below(4) {
            if d.is_empty() {
                break;
            }
            let at = rng.below(d.len() as u64) as usize;
            match rng.below(3) {
                0 => d[at] = rng.next() as u8,
                1 => drop(d.remove(at)),
                _ => d.insert(at, rng.next() as u8),
            }
        }
        d
    }

    fn control_stream() -> Vec<u8> {
        let mut d = vec![0];
        d.extend(
            Hello {
                version: PROTOCOL_VERSION,
                token: Some("0123456789abcdef".into()),
            }
            .encode(),
        );
        let requests = [
            Request::Create(CreateRequest {
                handler: Handler::Mem,
                key: "disk0".into(),
                size: 1 << 20,
                prealloc: false,
                options: [("a".to_string(), "b".to_string())].into(),
            }),
            Request::List {
                handler: None,
                filter: ListFilter::default(),
            },
            Request::MapDone {
                key: "/var/lib/nbd-runner/a.raw".into(),
                device: "/dev/nbd0".into(),
                connections: 2,
            },
        ];
        for r in &requests {
            write_frame(&mut d, r).unwrap();
        }
        d
    }

    #[test]
    fn control_driver_on_mutated_streams() {
        let good = control_stream();
        let whole = drive_control(&good);
        assert!(whole.hello && whole.requests == 3, "{whole:?}");
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let (mut hellos, mut requests) = (0, 0);
        for _ in 0..50_000 {
            let mut d = mutate(&mut rng, &good);
            if rng.below(4) == 0 && !d.is_empty() {
                d[0] |= 1; // the client's side: a reply
            }
            let o = drive_control(&d);
            hellos += usize::from(o.hello);
            requests += o.requests;
        }
        assert!(hellos > 10_000 && requests > 10_000, "{hellos} {requests}");
        // A frame header claiming more than the limit ends the stream
        // without allocating it.
        let mut d = vec![0];
        d.extend(
            Hello {
                version: 1,
                token: None,
            }
            .encode(),
        );
        d.extend((MAX_FRAME + 1).to_be_bytes());
        assert_eq!(drive_control(&d).requests, 0);
    }

    /// `NBD_FUZZ_WRITE_SEEDS=fuzz/seeds cargo test -p nbd-control seeds`
    /// rewrites the fuzz targets' seeds from these real encodings.
    #[test]
    fn seeds() {
        let Some(dir) = std::env::var_os("NBD_FUZZ_WRITE_SEEDS") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let mut reply = vec![1];
        reply.extend(
            HelloReply {
                version: PROTOCOL_VERSION,
                status: crate::wire::HelloStatus::Unauthorized,
                message: "access denied".into(),
            }
            .encode(),
        );
        for (target, name, data) in [
            ("control", "hello-create-list-mapdone", control_stream()),
            ("control", "hello-reply", reply),
            ("state", "file-and-mem", STATE_SEED.to_vec()),
        ] {
            std::fs::create_dir_all(dir.join(target)).unwrap();
            std::fs::write(dir.join(target).join(name), data).unwrap();
        }
    }

    const STATE_SEED: &[u8] = br#"{"schema":1,"backstores":[
            {"key":"/var/lib/nbd-runner/a.raw","handler":"file","size":1048576,"state":"mapped",
             "device":"/dev/nbd0","id":"nbd-runner:1","owned":true},
            {"key":"disk0","handler":"mem","size":4096,"state":"mapping","id":"nbd-runner:2","owned":true}
        ]}"#;

    #[test]
    fn state_driver_on_mutated_documents() {
        let good = STATE_SEED;
        let cfg = drive_state(good).expect("the seed loads");
        assert_eq!(cfg.backstores.len(), 2);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut loaded = 0;
        for _ in 0..50_000 {
            loaded += usize::from(drive_state(&mutate(&mut rng, good)).is_some());
        }
        assert!(loaded > 1_000, "{loaded}");
        for bad in [&b""[..], b"{}", b"[]", b"{\"schema\":99}", b"\xff\xfe"] {
            assert!(drive_state(bad).is_none());
        }
    }
}
