//! Human sizes: "1G", "1.5GiB", "512K", "4096" (bytes). Units are powers of 1024.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid size {input:?}: {reason}")]
pub struct SizeError {
    pub input: String,
    pub reason: &'static str,
}

pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let err = |reason| SizeError {
        input: input.to_owned(),
        reason,
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(err("expected a number, e.g. 10G or 1.5GiB"));
    }
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        "E" | "EB" | "EIB" => 60,
        _ => {
            return Err(err(
                "unknown unit (use B, K, M, G, T, P or E, optionally with iB)",
            ))
        }
    };
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if frac.contains('.') || (whole.is_empty() && frac.is_empty()) {
        return Err(err("malformed number"));
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| err("number too large"))?
    };
    let mut bytes = whole.checked_shl(shift).ok_or_else(|| err("too large"))?;
    if !frac.is_empty() {
        if frac.len() > 18 {
            return Err(err("too many decimals"));
        }
        let f: u128 = frac.parse().map_err(|_| err("malformed number"))?;
        let scale = 10u128.pow(frac.len() as u32);
        // Exact for whole-byte results; a fraction of a byte is refused below.
        let part = (f << shift) / scale;
        if !(f << shift).is_multiple_of(scale) {
            return Err(err("not a whole number of bytes"));
        }
        bytes += part;
    }
    u64::try_from(bytes).map_err(|_| err("larger than 16 EiB"))
}

/// 1073741824 → "1 GiB", 1610612736 → "1.5 GiB".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut v = bytes as f64;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_decimals() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("15E"), Ok(15 << 60));
        assert_eq!(parse_size(".5K"), Ok(512));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "G",
            "1X",
            "1.2.3G",
            "-1G",
            "16E",
            "99999999999999999999999999999",
            "1.0001B",
            ".",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }
}
