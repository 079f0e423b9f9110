//! `nbd-cli map ... shards LIST`: the runner shard for each of a device's
//! connections, in connection order: indexes and ranges ("0,2-3"), `auto`
//! for the least-loaded shard, or `auto` alone for all of them.

use thiserror::Error;

/// Entries a list may have: one per connection, and a map has at most
/// this many.
pub const MAX_ENTRIES: usize = 256;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid shard list {input:?}: {reason}")]
pub struct ShardListError {
    pub input: String,
    pub reason: String,
}

/// The shard of each connection (None: least-loaded); empty for `auto`.
pub fn parse_shard_list(input: &str) -> Result<Vec<Option<u32>>, ShardListError> {
    let err = |reason: String| ShardListError {
        input: input.to_owned(),
        reason,
    };
    let index = |s: &str| -> Result<u32, ShardListError> {
        s.trim()
            .parse()
            .map_err(|_| err(format!("{s:?} is not a shard index or auto")))
    };
    if input.trim() == "auto" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for part in input.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(err("expected shard indexes such as 0,1 or auto".into()));
        }
        if part == "auto" {
            out.push(None);
        } else if let Some((a, b)) = part.split_once('-') {
            let (from, to) = (index(a)?, index(b)?);
            if from > to {
                return Err(err(format!("range {part:?} runs backwards")));
            }
            if (to - from) as usize >= MAX_ENTRIES {
                return Err(err(format!("more than {MAX_ENTRIES} connections")));
            }
            out.extend((from..=to).map(Some));
        } else {
            out.push(Some(index(part)?));
        }
        if out.len() > MAX_ENTRIES {
            return Err(err(format!("more than {MAX_ENTRIES} connections")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_keep_order_and_repeats() {
        assert_eq!(parse_shard_list("1,0").unwrap(), [Some(1), Some(0)]);
        assert_eq!(
            parse_shard_list("0,0, 2-3,auto").unwrap(),
            [Some(0), Some(0), Some(2), Some(3), None]
        );
        assert_eq!(parse_shard_list("auto").unwrap(), []);
        assert_eq!(parse_shard_list("7").unwrap(), [Some(7)]);
    }

    #[test]
    fn bad_lists_say_why_in_one_line() {
        for (input, why) in [
            ("", "expected shard indexes"),
            ("0,,1", "expected shard indexes"),
            ("x", "not a shard index or auto"),
            ("-1", "not a shard index"),
            ("3-1", "runs backwards"),
            ("0-4294967295", "more than 256"),
            ("99999999999", "not a shard index"),
        ] {
            let e = parse_shard_list(input).unwrap_err().to_string();
            assert!(e.contains(why), "{input:?}: {e}");
            assert!(!e.contains('\n'));
        }
        let long = vec!["0"; MAX_ENTRIES + 1].join(",");
        assert!(parse_shard_list(&long).is_err());
        assert_eq!(
            parse_shard_list(&vec!["1"; MAX_ENTRIES].join(","))
                .unwrap()
                .len(),
            MAX_ENTRIES
        );
    }
}
