use super::*;

fn export(s: &str) -> Result<BackstoreSpec, String> {
    s.parse::<ExportSpec>().map(|e| e.0)
}

#[test]
fn parses_export_specs() {
    let s = export("mem:disk0,size=1G").unwrap();
    assert_eq!(
        s,
        BackstoreSpec {
            handler: Handler::Mem,
            key: "disk0".into(),
            size: Some(1 << 30),
            read_only: false,
            options: BTreeMap::new(),
        }
    );
    let s = export("file:/var/lib/a.raw,size=10G,readonly").unwrap();
    assert!(s.read_only);
    assert_eq!(s.size, Some(10 << 30));
    // Handler options ride along by name.
    let s = export("gluster:vol/dir/a.img,size=1G,server=10.0.0.1:24007");
    #[cfg(feature = "gluster")]
    assert_eq!(s.unwrap().options["server"], "10.0.0.1:24007");
    #[cfg(not(feature = "gluster"))]
    assert!(s.unwrap_err().contains("without the gluster handler"));
}

#[test]
fn refuses_bad_export_specs_in_one_line() {
    for (bad, why) in [
        ("disk0", "expected HANDLER:KEY"),
        ("mem:", "missing key"),
        ("mem:disk0", "need size=SIZE"),
        ("mem:disk0,size=abc", "bad export spec"),
        ("mem:disk0,size=0", "more than 0"),
        ("mem:disk0,size=1G,bogus", "unknown option \"bogus\""),
        ("mem:disk0,size=1G,server=x", "take no options"),
        ("mem:a/b,size=1G", "cannot contain '/'"),
        ("file:relative.img,size=1G", "absolute path"),
        ("file:/a/../etc/shadow,size=1G", "'..'"),
        ("nfs:x,size=1G", "unknown handler"),
        ("ceph:justone,size=1G", "ceph"),
    ] {
        let e = export(bad).unwrap_err();
        assert!(e.contains(why), "{bad}: {e:?} lacks {why:?}");
        assert!(!e.contains('\n'), "{bad}: one line");
    }
}

#[test]
fn every_handler_names_its_options() {
    let spec = |handler, opt: &str| BackstoreSpec {
        handler,
        key: match handler {
            Handler::File => "/x".into(),
            Handler::Mem => "x".into(),
            _ => "a/b".into(),
        },
        size: Some(1),
        read_only: false,
        options: BTreeMap::from([(opt.to_owned(), "v".to_owned())]),
    };
    for h in Handler::ALL {
        for o in options(h) {
            let r = spec(h, o).validate(Origin::Operator, &Settings::default());
            assert!(r.is_ok() || available(h).is_err(), "{h} {o}: {r:?}");
        }
        let r = spec(h, "nonsense")
            .validate(Origin::Operator, &Settings::default())
            .unwrap_err();
        assert!(r.contains("nonsense") || r.contains("without"), "{h}: {r}");
    }
}

fn no_defaults() -> Settings {
    Settings::default()
}

/// Settings whose only file root is `dir`.
fn rooted(dir: &Path) -> Settings {
    Settings {
        file_roots: FileRoots {
            roots: vec![dir.to_owned()],
            allow_block_devices: false,
        },
        ..Settings::default()
    }
}

#[test]
fn control_clients_may_not_name_host_files_or_hosts() {
    let spec = |handler, opt: &str| BackstoreSpec {
        handler,
        key: "pool/img".into(),
        size: Some(1),
        read_only: false,
        options: BTreeMap::from([(opt.to_owned(), "/etc/shadow".to_owned())]),
    };
    let strict = Settings::default();
    let lenient = Settings {
        allow_backstore_options: true,
        ..Settings::default()
    };
    for (h, o) in [
        (Handler::Ceph, "conf"),
        (Handler::Ceph, "keyring"),
        (Handler::Ceph, "id"),
        (Handler::Gluster, "server"),
    ] {
        if available(h).is_err() {
            continue;
        }
        let e = spec(h, o).validate(Origin::Control, &strict).unwrap_err();
        assert!(e.contains("--allow-backstore-options"), "{h} {o}: {e}");
        assert!(!e.contains('\n'));
        spec(h, o).validate(Origin::Control, &lenient).unwrap();
        spec(h, o).validate(Origin::Operator, &strict).unwrap();
    }
    if available(Handler::Ceph).is_ok() {
        // Options that name nothing on the host stay open to everyone.
        spec(Handler::Ceph, "object_size")
            .validate(Origin::Control, &strict)
            .unwrap();
    }
}

#[test]
fn mem_backstores_share_the_budget() {
    let settings = Settings {
        mem: MemBudget::new(3 << 20),
        ..Settings::default()
    };
    let spec = |key: &str, size| BackstoreSpec {
        handler: Handler::Mem,
        key: key.into(),
        size: Some(size),
        read_only: false,
        options: BTreeMap::new(),
    };
    let create = |s: &BackstoreSpec| {
        open(
            s,
            OpenMode::Create {
                prealloc: false,
                progress: &mut |_, _| {},
            },
            Origin::Control,
            &settings,
        )
    };
    let a = create(&spec("a", 2 << 20)).unwrap();
    for size in [2 << 20, 1 << 50, u64::MAX] {
        let e = create(&spec("b", size)).err().unwrap().to_string();
        assert!(e.contains("--mem-limit is 3 MiB"), "{e}");
    }
    drop(a);
    create(&spec("b", 3 << 20)).unwrap();
}

#[test]
fn file_create_adopt_and_open() {
    for origin in [Origin::Operator, Origin::Control] {
        file_create_adopt_and_open_as(origin);
    }
}

fn file_create_adopt_and_open_as(origin: Origin) {
    let dir = tempfile::tempdir().unwrap();
    let settings = rooted(dir.path());
    let path = dir.path().join("a.raw");
    let key = path.to_str().unwrap().to_owned();
    let spec = |size| BackstoreSpec {
        handler: Handler::File,
        key: key.clone(),
        size,
        read_only: false,
        options: BTreeMap::new(),
    };
    let create = |size| {
        open(
            &spec(size),
            OpenMode::Create {
                prealloc: false,
                progress: &mut |_, _| {},
            },
            origin,
            &settings,
        )
    };
    // Open needs the storage to be there.
    let gone = open(&spec(Some(4096)), OpenMode::Open, origin, &settings)
        .err()
        .unwrap()
        .to_string();
    assert!(
        gone.contains("gone") || gone.contains("does not exist"),
        "{gone}"
    );
    let made = create(Some(1 << 20)).unwrap();
    assert!(made.created);
    assert_eq!(made.backend.size(), 1 << 20);
    // Adopting takes the same size only, and is not "created".
    let again = create(Some(1 << 20)).unwrap();
    assert!(!again.created);
    let e = create(Some(2 << 20)).err().unwrap().to_string();
    assert!(e.contains("give its size to adopt it"), "{e}");
    // Open takes the file's own size.
    let opened = open(&spec(None), OpenMode::Open, origin, &settings).unwrap();
    assert_eq!(opened.backend.size(), 1 << 20);
    // Create without a size is refused.
    assert!(create(None).is_err());
}

#[test]
fn export_spec_creates_only_with_a_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.raw");
    let p = path.to_str().unwrap();
    let e = format!("file:{p}").parse::<ExportSpec>().unwrap();
    assert!(e.open(&no_defaults()).is_err(), "no size, no file");
    let e = format!("file:{p},size=1M").parse::<ExportSpec>().unwrap();
    assert!(e.open(&no_defaults()).unwrap().created);
    // Restarting with the same flag adopts what the first run made.
    assert!(!e.open(&no_defaults()).unwrap().created);
    let ro = format!("file:{p},readonly").parse::<ExportSpec>().unwrap();
    let b = ro.open(&no_defaults()).unwrap().backend;
    assert!(b.capabilities().read_only);
    let m = "mem:m,size=1M,readonly".parse::<ExportSpec>().unwrap();
    assert!(
        m.open(&no_defaults())
            .unwrap()
            .backend
            .capabilities()
            .read_only
    );
}

#[test]
fn control_file_keys_stay_beneath_the_roots_and_reveal_no_size() {
    let dir = tempfile::tempdir().unwrap();
    let settings = rooted(dir.path());
    let root = dir.path().to_str().unwrap();
    std::os::unix::fs::symlink("/etc/shadow", dir.path().join("shadow")).unwrap();
    for key in [
        "/etc/shadow".to_owned(),
        format!("{root}/../x"),
        format!("{root}/shadow"),
        "/dev/null".to_owned(),
    ] {
        let spec = BackstoreSpec {
            handler: Handler::File,
            key: key.clone(),
            size: Some(1),
            read_only: false,
            options: BTreeMap::new(),
        };
        let mode = OpenMode::Create {
            prealloc: false,
            progress: &mut |_, _| {},
        };
        let e = open(&spec, mode, Origin::Control, &settings)
            .err()
            .unwrap()
            .to_string();
        assert!(!e.contains("size"), "{key}: {e}");
        assert!(!e.contains('\n'), "{key}: {e}");
    }
}

#[test]
fn file_direct_io_is_an_option_of_both_origins() {
    let dir = tempfile::tempdir().unwrap();
    let settings = rooted(dir.path());
    let key = dir.path().join("d.raw").to_str().unwrap().to_owned();
    let spec = export(&format!("file:{key},size=1M,direct")).unwrap();
    assert_eq!(spec.options["direct"], "on");
    let create = |spec: &BackstoreSpec, origin| {
        open(
            spec,
            OpenMode::Create {
                prealloc: false,
                progress: &mut |_, _| {},
            },
            origin,
            &settings,
        )
    };
    for origin in [Origin::Operator, Origin::Control] {
        let b = create(&spec, origin).unwrap().backend;
        assert_eq!(b.capabilities().block.min, 4096, "{origin:?}");
        assert!(b.mode().contains("O_DIRECT"), "{}", b.mode());
    }
    let mut off = spec.clone();
    off.options.insert("direct".into(), "off".into());
    let b = create(&off, Origin::Control).unwrap().backend;
    assert_eq!(b.capabilities().block.min, 1);
    off.options.insert("direct".into(), "maybe".into());
    let e = create(&off, Origin::Control).err().unwrap().to_string();
    assert!(e.contains("direct takes on or off"), "{e}");
}
