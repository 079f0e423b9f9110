//! `HOST`, `HOST:PORT`, `[V6]`, `[V6]:PORT` and a bare `V6` address, split
//! the same way wherever the runner or the CLI takes an address.

/// Splits `s` into host and optional port text; the caller parses the port
/// and checks the host. Errors say what is wrong with the brackets.
pub fn split_host_port(s: &str) -> Result<(&str, Option<&str>), &'static str> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, tail) = rest.split_once(']').ok_or("unclosed '['")?;
        return match tail.strip_prefix(':') {
            Some(port) => Ok((host, Some(port))),
            None if tail.is_empty() => Ok((host, None)),
            None => Err("text after ']' that is not :PORT"),
        };
    }
    if s.matches(':').count() > 1 {
        return Ok((s, None)); // a bare IPv6 address
    }
    Ok(match s.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (s, None),
    })
}

#[cfg(test)]
mod tests {
    use super::split_host_port as split;

    #[test]
    fn every_form() {
        assert_eq!(split("gl1"), Ok(("gl1", None)));
        assert_eq!(split("gl1:24007"), Ok(("gl1", Some("24007"))));
        assert_eq!(split("[::1]:9"), Ok(("::1", Some("9"))));
        assert_eq!(split("[::1]"), Ok(("::1", None)));
        assert_eq!(split("fe80::1"), Ok(("fe80::1", None)));
        assert_eq!(split("h:"), Ok(("h", Some(""))));
        assert!(split("[::1").is_err());
        assert!(split("[::1]x").is_err());
        assert!(split("[::1]x:9").is_err());
    }
}
