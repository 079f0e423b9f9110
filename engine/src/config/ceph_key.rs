//! A ceph backstore's key: `POOL/IMAGE`, `POOL/NAMESPACE/IMAGE`, either
//! with `@SNAP`. Parsed here, without librbd, so builds without the ceph
//! handler (and `nbd-cli list --json`) read keys the same way.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CephKey {
    pub pool: String,
    pub namespace: Option<String>,
    pub image: String,
    pub snapshot: Option<String>,
}

impl CephKey {
    pub fn parse(key: &str) -> Result<CephKey, String> {
        let parts: Vec<&str> = key.split('/').collect();
        let (pool, namespace, image) = match parts[..] {
            [p, i] => (p, None, i),
            [p, n, i] => (p, Some(n), i),
            _ => {
                return Err("expected POOL/IMAGE, POOL/NAMESPACE/IMAGE or either with @SNAP".into())
            }
        };
        let (image, snapshot) = match image.split_once('@') {
            Some((i, s)) if s.is_empty() || s.contains('@') => {
                return Err(format!("bad snapshot name after {i:?}"))
            }
            Some((i, s)) => (i, Some(s)),
            None => (image, None),
        };
        if [pool, image].iter().any(|s| s.is_empty()) || namespace == Some("") {
            return Err("empty pool, namespace or image name".into());
        }
        Ok(CephKey {
            pool: pool.into(),
            namespace: namespace.map(Into::into),
            image: image.into(),
            snapshot: snapshot.map(Into::into),
        })
    }
}

impl std::fmt::Display for CephKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/", self.pool)?;
        if let Some(ns) = &self.namespace {
            write!(f, "{ns}/")?;
        }
        write!(f, "{}", self.image)?;
        if let Some(s) = &self.snapshot {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::CephKey;

    #[test]
    fn every_form_and_back() {
        for key in ["rbd/img", "rbd/ns/img", "rbd/img@s1", "rbd/ns/img@s1"] {
            assert_eq!(CephKey::parse(key).unwrap().to_string(), key);
        }
        let k = CephKey::parse("rbd/ns/img@s1").unwrap();
        assert_eq!(
            (
                k.pool.as_str(),
                k.namespace.as_deref(),
                k.image.as_str(),
                k.snapshot.as_deref()
            ),
            ("rbd", Some("ns"), "img", Some("s1"))
        );
        for bad in [
            "rbd",
            "a/b/c/d",
            "/img",
            "rbd//img",
            "rbd/img@",
            "rbd/@s",
            "rbd/i@a@b",
        ] {
            assert!(CephKey::parse(bad).is_err(), "{bad}");
        }
    }
}
