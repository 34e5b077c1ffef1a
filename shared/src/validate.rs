//! Validation errors that name the resource and the field, and the small checkers shared by
//! every resource's conversion (names, hosts, endpoints, header names, CIDRs, paths).

use std::fmt;
use std::net::IpAddr;

use crate::Kind;

/// One problem with one field of one resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: Kind,
    pub name: String,
    /// Dotted path inside the resource (`match.path.template`); empty for the whole resource.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.name.is_empty() { "<unnamed>" } else { &self.name };
        if self.field.is_empty() {
            write!(f, "{} {}: {}", self.kind, name, self.message)
        } else {
            write!(f, "{} {}: {}: {}", self.kind, name, self.field, self.message)
        }
    }
}

/// Every problem found; validation does not stop at the first.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
pub struct Violations(pub Vec<Violation>);

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{v}")?;
        }
        Ok(())
    }
}

impl Violations {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_result<T>(self, value: T) -> Result<T, Violations> {
        if self.0.is_empty() { Ok(value) } else { Err(self) }
    }
}

/// Collects violations for one resource; fields are named relative to it.
pub struct Checker {
    kind: Kind,
    name: String,
    pub(crate) out: Violations,
}

impl Checker {
    pub fn new(kind: Kind, name: &str) -> Checker {
        Checker { kind, name: name.to_owned(), out: Violations::default() }
    }

    pub fn fail(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.out.0.push(Violation {
            kind: self.kind,
            name: self.name.clone(),
            field: field.into(),
            message: message.into(),
        });
    }

    /// Records `Err` as a violation of `field`; returns the value on `Ok`.
    pub fn check<T, E: fmt::Display>(&mut self, field: impl Into<String>, r: Result<T, E>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.fail(field, e.to_string());
                None
            }
        }
    }

    pub fn finish<T>(self, value: T) -> Result<T, Violations> {
        self.out.into_result(value)
    }
}

/// Resource names: lower-case DNS subdomain (RFC 1123): `[a-z0-9]([a-z0-9.-]*[a-z0-9])?`, ≤ 253.
pub fn name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("name is empty".into());
    }
    if s.len() > 253 {
        return Err(format!("name is {} characters long; the limit is 253", s.len()));
    }
    let ok_char = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.';
    let b = s.as_bytes();
    if !b.iter().all(|&c| ok_char(c)) || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return Err(format!(
            "invalid name {s:?}: use lower-case letters, digits, '-' and '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A DNS host name (no wildcard, no port), 1-253 chars, labels 1-63 of `[A-Za-z0-9-]`.
pub fn hostname(s: &str) -> Result<(), String> {
    let bad = || Err(format!("invalid host name {s:?}"));
    if s.is_empty() || s.len() > 253 {
        return bad();
    }
    for label in s.strip_suffix('.').unwrap_or(s).split('.') {
        let b = label.as_bytes();
        if b.is_empty()
            || b.len() > 63
            || !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
            || b[0] == b'-'
            || b[b.len() - 1] == b'-'
        {
            return bad();
        }
    }
    Ok(())
}

/// A route host: `*` (any), `*.example.com` (one or more labels), an exact host name or IP.
pub fn route_host(s: &str) -> Result<(), String> {
    if s == "*" {
        return Ok(());
    }
    if let Some(rest) = s.strip_prefix("*.") {
        return hostname(rest).map_err(|_| format!("invalid wildcard host {s:?}: expected *.example.com"));
    }
    if s.contains('*') {
        return Err(format!("invalid host {s:?}: a wildcard is only allowed as the whole first label (*.example.com)"));
    }
    if s.contains(':') && s.parse::<IpAddr>().is_err() {
        return Err(format!("invalid host {s:?}: hosts are matched without a port"));
    }
    if s.parse::<IpAddr>().is_ok() { Ok(()) } else { hostname(s) }
}

/// An upstream endpoint `host:port` or `[v6]:port`.
pub fn endpoint(s: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("invalid endpoint {s:?}: {why}"));
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((h, p)) = rest.split_once("]:") else {
            return bad("expected [ipv6]:port");
        };
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return bad("not an IPv6 address");
        }
        (None, p)
    } else {
        let Some((h, p)) = s.rsplit_once(':') else {
            return bad("expected host:port");
        };
        (Some(h), p)
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return bad("port must be 1-65535"),
    }
    if let Some(h) = host
        && h.parse::<std::net::Ipv4Addr>().is_err()
        && hostname(h).is_err()
    {
        return bad("host is neither an IPv4 address nor a host name");
    }
    Ok(())
}

/// An HTTP header field name (RFC 9110 token), stored lower-case.
pub fn header_name(s: &str) -> Result<(), String> {
    let tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    if s.is_empty() || !s.bytes().all(tchar) {
        return Err(format!("invalid header name {s:?}"));
    }
    Ok(())
}

/// A header value: visible ASCII, spaces and tabs; no CR/LF.
pub fn header_value(s: &str) -> Result<(), String> {
    if s.bytes().all(|c| c == b'\t' || (b' '..=b'~').contains(&c)) {
        Ok(())
    } else {
        Err(format!("invalid header value {s:?}: only visible ASCII, space and tab are allowed"))
    }
}

/// A CIDR (`10.0.0.0/8`, `::1/128`) or a bare address (taken as /32 or /128).
pub fn cidr(s: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(net) = s.parse::<ipnet::IpNet>() {
        if net.trunc() != net {
            return Err(format!("invalid CIDR {s:?}: host bits are set; did you mean {}?", net.trunc()));
        }
        return Ok(net);
    }
    s.parse::<IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| format!("invalid CIDR {s:?}: expected e.g. 10.0.0.0/8 or 2001:db8::/32"))
}

/// An absolute http(s) URL with a host; the control plane fetches these.
pub fn http_url(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(|| format!("invalid URL {s:?}: expected http:// or https://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') || s.bytes().any(|c| c <= b' ' || c == 0x7f) {
        return Err(format!("invalid URL {s:?}"));
    }
    Ok(())
}

/// A route path literal: absolute, already in the normal form the proxy matches against
/// (no `.`/`..` segments, no empty segments, no query or fragment, no percent-escapes of
/// unreserved characters). Templates are checked by the route module.
pub fn route_path(s: &str) -> Result<(), String> {
    if s.len() > crate::path::MAX_PATH_LEN {
        return Err(format!("path is {} bytes long; the limit is {}", s.len(), crate::path::MAX_PATH_LEN));
    }
    if !s.starts_with('/') {
        return Err(format!("path {s:?} must start with '/'"));
    }
    if s.contains(['?', '#']) {
        return Err(format!("path {s:?} must not contain a query or fragment"));
    }
    if s.bytes().any(|c| c <= b' ' || c >= 0x7f || c == b'\\') {
        return Err(format!("path {s:?} contains a space, control, non-ASCII or backslash character"));
    }
    // A trailing slash is allowed: "/api/" and "/api" are different paths.
    for seg in s[1..].split('/') {
        if seg == "." || seg == ".." {
            return Err(format!("path {s:?} contains a dot segment"));
        }
    }
    if s.contains("//") {
        return Err(format!("path {s:?} contains an empty segment (//)"));
    }
    if s.contains('%') {
        return Err(format!("path {s:?} contains a percent-escape: write the decoded character"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(f: fn(&str) -> Result<(), String>, input: &str, ok: bool) {
        assert_eq!(f(input).is_ok(), ok, "{input}: {:?}", f(input));
    }

    #[test]
    fn names() {
        for (s, ok) in [
            ("orders", true),
            ("orders-v2", true),
            ("a", true),
            ("corp-idp.key-1", true),
            ("", false),
            ("Orders", false),
            ("-orders", false),
            ("orders-", false),
            ("or ders", false),
            ("orders/x", false),
            (&"a".repeat(254), false),
        ] {
            check(name, s, ok);
        }
    }

    #[test]
    fn route_hosts() {
        for (s, ok) in [
            ("*", true),
            ("api.example.com", true),
            ("*.example.com", true),
            ("127.0.0.1", true),
            ("::1", true),
            ("a*.example.com", false),
            ("*.", false),
            ("api.example.com:8080", false),
            ("exa mple.com", false),
            ("-bad.com", false),
        ] {
            check(route_host, s, ok);
        }
    }

    #[test]
    fn endpoints() {
        for (s, ok) in [
            ("127.0.0.1:9000", true),
            ("orders.internal:80", true),
            ("[::1]:443", true),
            ("127.0.0.1", false),
            ("127.0.0.1:0", false),
            ("127.0.0.1:70000", false),
            ("[::1]", false),
            ("[zz]:80", false),
            (":80", false),
            ("http://x:80", false),
        ] {
            check(endpoint, s, ok);
        }
    }

    #[test]
    fn cidrs() {
        assert!(cidr("10.0.0.0/8").is_ok());
        assert!(cidr("10.1.2.3").is_ok());
        assert!(cidr("2001:db8::/32").is_ok());
        assert!(cidr("10.0.0.1/8").unwrap_err().contains("did you mean 10.0.0.0/8"));
        assert!(cidr("10.0.0.0/33").is_err());
        assert!(cidr("ten").is_err());
    }

    #[test]
    fn paths() {
        for (s, ok) in [
            ("/", true),
            ("/api", true),
            ("/api/", true),
            ("/api/v1/orders", true),
            ("api", false),
            ("/api/../x", false),
            ("/api/./x", false),
            ("/api//x", false),
            ("/api?x=1", false),
            ("/a%2Fb", false),
            ("/a b", false),
            ("/a\\b", false),
        ] {
            check(route_path, s, ok);
        }
    }

    #[test]
    fn urls_and_headers() {
        check(http_url, "https://idp.example.com/", true);
        check(http_url, "http://127.0.0.1:8080/jwks", true);
        check(http_url, "ftp://x", false);
        check(http_url, "https://", false);
        check(http_url, "https://user@host/", false);
        check(header_name, "x-request-id", true);
        check(header_name, "bad header", false);
        check(header_name, "", false);
        check(header_value, "abc def", true);
        check(header_value, "a\r\nb", false);
    }

    #[test]
    fn violation_display_names_resource_and_field() {
        let v = Violation {
            kind: Kind::Route,
            name: "orders".into(),
            field: "match.path".into(),
            message: "path \"x\" must start with '/'".into(),
        };
        assert_eq!(v.to_string(), "route orders: match.path: path \"x\" must start with '/'");
    }
}
