//! The syntax of `--export HANDLER:KEY[,size=SIZE][,readonly][,direct][,NAME=VALUE]...`.

use super::size::parse_size;
use std::collections::BTreeMap;

/// An export spec as written; the handler and options are checked by the
/// factory that opens it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawExportSpec {
    pub handler: String,
    pub key: String,
    pub size: Option<u64>,
    pub read_only: bool,
    pub options: BTreeMap<String, String>,
}

pub fn parse(spec: &str) -> Result<RawExportSpec, String> {
    let bad = |reason: &str| format!("bad export spec {spec:?}: {reason}");
    let (handler, rest) = spec
        .split_once(':')
        .ok_or_else(|| bad("expected HANDLER:KEY, e.g. mem:disk0,size=1G"))?;
    let mut parts = rest.split(',');
    let key = parts.next().unwrap_or_default();
    if key.is_empty() {
        return Err(bad("missing key"));
    }
    let mut out = RawExportSpec {
        handler: handler.to_owned(),
        key: key.to_owned(),
        size: None,
        read_only: false,
        options: BTreeMap::new(),
    };
    for p in parts {
        match p.split_once('=') {
            Some(("size", v)) => out.size = Some(parse_size(v).map_err(|e| bad(&e.to_string()))?),
            Some((k, v)) if !k.is_empty() => {
                out.options.insert(k.to_owned(), v.to_owned());
            }
            None if p == "readonly" => out.read_only = true,
            // Bare `direct` is `direct=on`.
            None if p == "direct" => {
                out.options.insert("direct".into(), "on".into());
            }
            _ => {
                return Err(bad(&format!(
                    "unknown option {p:?} (size=SIZE, readonly, direct, NAME=VALUE)"
                )))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax() {
        let s = parse("ceph:rbd/a,size=1G,readonly,conf=/c").unwrap();
        assert_eq!((s.handler.as_str(), s.key.as_str()), ("ceph", "rbd/a"));
        assert_eq!((s.size, s.read_only), (Some(1 << 30), true));
        assert_eq!(s.options["conf"], "/c");
        let d = parse("file:/x.raw,direct").unwrap();
        assert_eq!(d.options["direct"], "on");
        for bad in ["x", "mem:", "mem:a,size=zz", "mem:a,bogus", "mem:a,=v"] {
            assert!(
                parse(bad).unwrap_err().starts_with("bad export spec"),
                "{bad}"
            );
        }
    }
}
