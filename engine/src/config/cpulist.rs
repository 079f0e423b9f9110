//! CPU lists in the kernel's format: "2-5,8" (as in `taskset -c`,
//! `/sys/devices/system/cpu/online` and `Cpus_allowed_list`).

use thiserror::Error;

/// CPUs a `cpu_set_t` can name.
pub const MAX_CPUS: usize = libc::CPU_SETSIZE as usize;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid CPU list {input:?}: {reason}")]
pub struct CpuListError {
    pub input: String,
    pub reason: String,
}

/// The CPUs of `input`, in the order given, each once.
pub fn parse_cpu_list(input: &str) -> Result<Vec<usize>, CpuListError> {
    let err = |reason: String| CpuListError {
        input: input.to_owned(),
        reason,
    };
    let cpu = |s: &str| -> Result<usize, CpuListError> {
        let n: usize = s
            .trim()
            .parse()
            .map_err(|_| err(format!("{s:?} is not a CPU number")))?;
        if n >= MAX_CPUS {
            return Err(err(format!(
                "CPU {n} is past the largest, {}",
                MAX_CPUS - 1
            )));
        }
        Ok(n)
    };
    let mut out = Vec::new();
    for part in input.split(',') {
        if part.trim().is_empty() {
            return Err(err("expected CPUs such as 0-3,8".into()));
        }
        let (from, to) = match part.split_once('-') {
            Some((a, b)) => (cpu(a)?, cpu(b)?),
            None => {
                let c = cpu(part)?;
                (c, c)
            }
        };
        if from > to {
            return Err(err(format!("range {part:?} runs backwards")));
        }
        for c in from..=to {
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    Ok(out)
}

/// The kernel's compact form of `cpus` ("0-3,8"), for messages and tests.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        while i + 1 < sorted.len() && sorted[i + 1] == sorted[i] + 1 {
            i += 1;
        }
        parts.push(if sorted[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", sorted[i])
        });
        i += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_ranges_and_their_compact_form() {
        assert_eq!(parse_cpu_list("2-5,8").unwrap(), vec![2, 3, 4, 5, 8]);
        assert_eq!(parse_cpu_list("3").unwrap(), vec![3]);
        assert_eq!(parse_cpu_list("8,1, 2").unwrap(), vec![8, 1, 2]);
        assert_eq!(parse_cpu_list("1-2,2-3").unwrap(), vec![1, 2, 3]);
        assert_eq!(format_cpu_list(&[8, 2, 3, 4, 5, 3]), "2-5,8");
        assert_eq!(format_cpu_list(&[0]), "0");
        assert_eq!(format_cpu_list(&[0, 2]), "0,2");
    }

    #[test]
    fn mistakes_get_one_line_reasons() {
        for (input, want) in [
            ("", "expected CPUs"),
            ("1,,2", "expected CPUs"),
            ("a", "not a CPU number"),
            ("-1", "not a CPU number"),
            ("5-2", "runs backwards"),
            ("0-99999999999999999999", "not a CPU number"),
            ("1024", "past the largest"),
            ("0-100000", "past the largest"),
        ] {
            let e = parse_cpu_list(input).unwrap_err().to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{input:?}: {e}");
        }
    }
}
