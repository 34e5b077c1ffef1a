//! Every client-visible outcome the proxy itself decides: one [`Denial`] enum, one stable
//! [`Reason`] vocabulary (the same snake_case strings in metrics, logs and audit), and ONE
//! function, [`Denial::to_response`], that turns a denial into a status, its headers
//! (`WWW-Authenticate` on 401, `Allow` on 405, `Retry-After` on 503) and a short
//! `application/problem+json` body.
//!
//! What it must not do: put upstream details, addresses, internal error messages or anything
//! the client sent (other than the validated request id) into a response. The details are fixed
//! strings per reason.

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use portcullis_shared::claims::ClaimDenial;
use portcullis_shared::jwt::JwtError;
use portcullis_shared::path::PathError;

use crate::router::MethodSet;

/// Why a request was refused or failed, as a bounded vocabulary. `Reason as usize` indexes the
/// per-route counters in [`crate::metrics`], so the request path never formats a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    PathNotAbsolute,
    PathTooLong,
    PathEncodedSlash,
    PathEncodedBackslash,
    PathBackslash,
    PathEncodedNul,
    PathEncodedControl,
    PathInvalidEncoding,
    PathInvalidUtf8,
    PathTraversal,
    PathInvalidCharacter,
    RouteNotFound,
    MethodNotAllowed,
    TokenMissing,
    TokenUnverified,
    TokenMalformed,
    TokenAlgNone,
    TokenAlgNotAllowed,
    TokenAlgKeyMismatch,
    TokenHeaderKeyForbidden,
    TokenCritUnsupported,
    TokenTypInvalid,
    TokenKidUnknown,
    TokenSignatureInvalid,
    TokenExpired,
    TokenNotYetValid,
    TokenTooOld,
    TokenIssuerMismatch,
    TokenAudienceMismatch,
    TokenClaimInvalid,
    TokenInactive,
    IntrospectionUnavailable,
    ScopeMissing,
    ClaimMissing,
    ClaimMismatch,
    IpDenied,
    IpNotAllowed,
    BodyTooLarge,
    HeadersTooLarge,
    UpstreamConnectFailed,
    UpstreamReset,
    UpstreamTlsFailed,
    UpstreamUnavailable,
    UpstreamConnectTimeout,
    UpstreamTimeout,
    NotReady,
    RequestInvalid,
}

impl Reason {
    pub const ALL: [Reason; 47] = [
        Reason::PathNotAbsolute,
        Reason::PathTooLong,
        Reason::PathEncodedSlash,
        Reason::PathEncodedBackslash,
        Reason::PathBackslash,
        Reason::PathEncodedNul,
        Reason::PathEncodedControl,
        Reason::PathInvalidEncoding,
        Reason::PathInvalidUtf8,
        Reason::PathTraversal,
        Reason::PathInvalidCharacter,
        Reason::RouteNotFound,
        Reason::MethodNotAllowed,
        Reason::TokenMissing,
        Reason::TokenUnverified,
        Reason::TokenMalformed,
        Reason::TokenAlgNone,
        Reason::TokenAlgNotAllowed,
        Reason::TokenAlgKeyMismatch,
        Reason::TokenHeaderKeyForbidden,
        Reason::TokenCritUnsupported,
        Reason::TokenTypInvalid,
        Reason::TokenKidUnknown,
        Reason::TokenSignatureInvalid,
        Reason::TokenExpired,
        Reason::TokenNotYetValid,
        Reason::TokenTooOld,
        Reason::TokenIssuerMismatch,
        Reason::TokenAudienceMismatch,
        Reason::TokenClaimInvalid,
        Reason::TokenInactive,
        Reason::IntrospectionUnavailable,
        Reason::ScopeMissing,
        Reason::ClaimMissing,
        Reason::ClaimMismatch,
        Reason::IpDenied,
        Reason::IpNotAllowed,
        Reason::BodyTooLarge,
        Reason::HeadersTooLarge,
        Reason::UpstreamConnectFailed,
        Reason::UpstreamReset,
        Reason::UpstreamTlsFailed,
        Reason::UpstreamUnavailable,
        Reason::UpstreamConnectTimeout,
        Reason::UpstreamTimeout,
        Reason::NotReady,
        Reason::RequestInvalid,
    ];

    /// The stable name, shared by metrics labels, logs and audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PathNotAbsolute => "path_not_absolute",
            Reason::PathTooLong => "path_too_long",
            Reason::PathEncodedSlash => "path_encoded_slash",
            Reason::PathEncodedBackslash => "path_encoded_backslash",
            Reason::PathBackslash => "path_backslash",
            Reason::PathEncodedNul => "path_encoded_nul",
            Reason::PathEncodedControl => "path_encoded_control",
            Reason::PathInvalidEncoding => "path_invalid_encoding",
            Reason::PathInvalidUtf8 => "path_invalid_utf8",
            Reason::PathTraversal => "path_traversal",
            Reason::PathInvalidCharacter => "path_invalid_character",
            Reason::RouteNotFound => "route_not_found",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::TokenMissing => "token_missing",
            Reason::TokenUnverified => "token_unverified",
            Reason::TokenMalformed => "token_malformed",
            Reason::TokenAlgNone => "token_alg_none",
            Reason::TokenAlgNotAllowed => "token_alg_not_allowed",
            Reason::TokenAlgKeyMismatch => "token_alg_key_mismatch",
            Reason::TokenHeaderKeyForbidden => "token_header_key_forbidden",
            Reason::TokenCritUnsupported => "token_crit_unsupported",
            Reason::TokenTypInvalid => "token_typ_invalid",
            Reason::TokenKidUnknown => "token_kid_unknown",
            Reason::TokenSignatureInvalid => "token_signature_invalid",
            Reason::TokenExpired => "token_expired",
            Reason::TokenNotYetValid => "token_not_yet_valid",
            Reason::TokenTooOld => "token_too_old",
            Reason::TokenIssuerMismatch => "token_issuer_mismatch",
            Reason::TokenAudienceMismatch => "token_audience_mismatch",
            Reason::TokenClaimInvalid => "token_claim_invalid",
            Reason::TokenInactive => "token_inactive",
            Reason::IntrospectionUnavailable => "introspection_unavailable",
            Reason::ScopeMissing => "scope_missing",
            Reason::ClaimMissing => "claim_missing",
            Reason::ClaimMismatch => "claim_mismatch",
            Reason::IpDenied => "ip_denied",
            Reason::IpNotAllowed => "ip_not_allowed",
            Reason::BodyTooLarge => "body_too_large",
            Reason::HeadersTooLarge => "headers_too_large",
            Reason::UpstreamConnectFailed => "upstream_connect_failed",
            Reason::UpstreamReset => "upstream_reset",
            Reason::UpstreamTlsFailed => "upstream_tls_failed",
            Reason::UpstreamUnavailable => "upstream_unavailable",
            Reason::UpstreamConnectTimeout => "upstream_connect_timeout",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::NotReady => "not_ready",
            Reason::RequestInvalid => "request_invalid",
        }
    }

    /// The status every denial with this reason gets.
    pub fn status(self) -> StatusCode {
        match self {
            Reason::PathNotAbsolute
            | Reason::PathTooLong
            | Reason::PathEncodedSlash
            | Reason::PathEncodedBackslash
            | Reason::PathBackslash
            | Reason::PathEncodedNul
            | Reason::PathEncodedControl
            | Reason::PathInvalidEncoding
            | Reason::PathInvalidUtf8
            | Reason::PathTraversal
            | Reason::PathInvalidCharacter
            | Reason::RequestInvalid => StatusCode::BAD_REQUEST,
            Reason::RouteNotFound => StatusCode::NOT_FOUND,
            Reason::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Reason::TokenMissing
            | Reason::TokenUnverified
            | Reason::TokenMalformed
            | Reason::TokenAlgNone
            | Reason::TokenAlgNotAllowed
            | Reason::TokenAlgKeyMismatch
            | Reason::TokenHeaderKeyForbidden
            | Reason::TokenCritUnsupported
            | Reason::TokenTypInvalid
            | Reason::TokenKidUnknown
            | Reason::TokenSignatureInvalid
            | Reason::TokenExpired
            | Reason::TokenNotYetValid
            | Reason::TokenTooOld
            | Reason::TokenIssuerMismatch
            | Reason::TokenAudienceMismatch
            | Reason::TokenClaimInvalid
            | Reason::TokenInactive => StatusCode::UNAUTHORIZED,
            Reason::IpDenied
            | Reason::IpNotAllowed
            | Reason::ScopeMissing
            | Reason::ClaimMissing
            | Reason::ClaimMismatch => StatusCode::FORBIDDEN,
            Reason::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reason::UpstreamConnectFailed | Reason::UpstreamReset | Reason::UpstreamTlsFailed => {
                StatusCode::BAD_GATEWAY
            }
            Reason::UpstreamUnavailable | Reason::NotReady | Reason::IntrospectionUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Reason::UpstreamConnectTimeout | Reason::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn of_path(e: &PathError) -> Reason {
        match e {
            PathError::NotAbsolute => Reason::PathNotAbsolute,
            PathError::TooLong { .. } => Reason::PathTooLong,
            PathError::EncodedSlash => Reason::PathEncodedSlash,
            PathError::EncodedBackslash => Reason::PathEncodedBackslash,
            PathError::Backslash => Reason::PathBackslash,
            PathError::EncodedNul => Reason::PathEncodedNul,
            PathError::EncodedControl => Reason::PathEncodedControl,
            PathError::InvalidEncoding => Reason::PathInvalidEncoding,
            PathError::InvalidUtf8 => Reason::PathInvalidUtf8,
            PathError::Traversal => Reason::PathTraversal,
            PathError::InvalidCharacter => Reason::PathInvalidCharacter,
        }
    }

    /// The fixed, client-safe explanation in the problem body.
    fn detail(self) -> &'static str {
        match self {
            Reason::PathNotAbsolute => "the request path must start with '/'",
            Reason::PathTooLong => "the request path is too long",
            Reason::PathEncodedSlash => "the request path contains an encoded slash (%2F)",
            Reason::PathEncodedBackslash => "the request path contains an encoded backslash (%5C)",
            Reason::PathBackslash => "the request path contains a backslash",
            Reason::PathEncodedNul => "the request path contains an encoded nul (%00)",
            Reason::PathEncodedControl => "the request path contains an encoded control character",
            Reason::PathInvalidEncoding => "the request path contains an invalid percent-encoding",
            Reason::PathInvalidUtf8 => "the request path contains percent-encoded bytes that are not utf-8",
            Reason::PathTraversal => "the request path climbs above the root",
            Reason::PathInvalidCharacter => "the request path contains a character that is not allowed",
            Reason::RouteNotFound => "no route matches the request",
            Reason::MethodNotAllowed => "the route does not allow this method",
            Reason::TokenMissing => "a bearer token is required",
            Reason::TokenUnverified => "the bearer token could not be verified",
            // Like JwtError::description: no key, claim or check is named; only expiry is told apart.
            Reason::TokenExpired => "the access token expired",
            Reason::TokenMalformed
            | Reason::TokenAlgNone
            | Reason::TokenAlgNotAllowed
            | Reason::TokenAlgKeyMismatch
            | Reason::TokenHeaderKeyForbidden
            | Reason::TokenCritUnsupported
            | Reason::TokenTypInvalid
            | Reason::TokenKidUnknown
            | Reason::TokenSignatureInvalid
            | Reason::TokenNotYetValid
            | Reason::TokenTooOld
            | Reason::TokenIssuerMismatch
            | Reason::TokenAudienceMismatch
            | Reason::TokenClaimInvalid
            | Reason::TokenInactive => "the access token is invalid",
            Reason::ScopeMissing | Reason::ClaimMissing | Reason::ClaimMismatch => {
                "the access token does not grant access to this resource"
            }
            Reason::IpDenied => "the client address is denied",
            Reason::IpNotAllowed => "the client address is not allowed",
            Reason::BodyTooLarge => "the request body is larger than the limit",
            Reason::HeadersTooLarge => "the request headers are larger than the limit",
            Reason::UpstreamConnectFailed | Reason::UpstreamReset | Reason::UpstreamTlsFailed => {
                "the upstream service could not be reached"
            }
            Reason::UpstreamUnavailable => "the upstream service is unavailable",
            Reason::UpstreamConnectTimeout | Reason::UpstreamTimeout => "the upstream service did not answer in time",
            Reason::NotReady => "the proxy has no configuration yet",
            Reason::RequestInvalid => "the request is not valid HTTP/1.1",
            Reason::IntrospectionUnavailable => "the access token cannot be checked right now",
        }
    }
}

/// Why authentication failed (401).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// No bearer token (no `Authorization` header, or another scheme) on a route that requires
    /// one: the challenge carries no `error` (RFC 6750 §3.1).
    Missing,
    /// A token of a kind the policy cannot check: not a JWT where the policy accepts JWTs only,
    /// or an opaque token where none of the policy's issuers has an introspection endpoint.
    Unverified,
    /// A token that failed verification; the challenge says `error="invalid_token"` with the
    /// error's client-safe [`JwtError::description`]. Never [`JwtError::Missing`].
    Invalid(JwtError),
}

impl AuthFailure {
    fn reason(&self) -> Reason {
        match self {
            AuthFailure::Missing => Reason::TokenMissing,
            AuthFailure::Unverified => Reason::TokenUnverified,
            AuthFailure::Invalid(e) => match e {
                JwtError::Missing => Reason::TokenMissing,
                JwtError::Malformed(_) => Reason::TokenMalformed,
                JwtError::AlgNone => Reason::TokenAlgNone,
                JwtError::AlgNotAllowed => Reason::TokenAlgNotAllowed,
                JwtError::AlgKeyMismatch => Reason::TokenAlgKeyMismatch,
                JwtError::HeaderKeyForbidden(_) => Reason::TokenHeaderKeyForbidden,
                JwtError::CritUnsupported => Reason::TokenCritUnsupported,
                JwtError::TypInvalid => Reason::TokenTypInvalid,
                JwtError::KidUnknown { .. } => Reason::TokenKidUnknown,
                JwtError::SignatureInvalid => Reason::TokenSignatureInvalid,
                JwtError::Expired => Reason::TokenExpired,
                JwtError::NotYetValid => Reason::TokenNotYetValid,
                JwtError::TooOld => Reason::TokenTooOld,
                JwtError::IssuerMismatch => Reason::TokenIssuerMismatch,
                JwtError::AudienceMismatch => Reason::TokenAudienceMismatch,
                JwtError::ClaimInvalid(_) => Reason::TokenClaimInvalid,
                JwtError::Inactive => Reason::TokenInactive,
            },
        }
    }
}

/// Why the client address was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forbidden {
    /// The address is in a deny CIDR.
    IpDenied,
    /// The policy has allow CIDRs and the address is in none of them.
    IpNotAllowed,
}

/// Why the upstream could not be used (502).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadGateway {
    /// Connection refused, unreachable, DNS failure.
    ConnectFailed,
    /// The connection broke before a response head arrived.
    Reset,
    /// The TLS handshake with the upstream failed (its certificate did not verify against the
    /// configured roots or name, no common protocol version or ALPN, not a TLS server).
    TlsFailed,
}

/// Which deadline passed (504).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    Connect,
    Request,
}

/// A request the proxy answers itself. Stages return it; only [`Denial::to_response`] turns it
/// into a response.
#[derive(Debug, PartialEq, Eq)]
pub enum Denial {
    /// The path failed normalization.
    BadRequest(PathError),
    /// The request head or body framing is not valid HTTP/1.1 (what is wrong goes to the log,
    /// never to the client).
    InvalidRequest(&'static str),
    NotFound,
    MethodNotAllowed {
        allow: MethodSet,
    },
    Unauthorized(AuthFailure),
    Forbidden(Forbidden),
    /// A verified token that does not satisfy the policy's scopes or claim rules (403,
    /// `error="insufficient_scope"`).
    InsufficientScope(ClaimDenial),
    PayloadTooLarge,
    HeadersTooLarge,
    BadGateway(BadGateway),
    /// No endpoint can take the request (reserved: the balancer tries ejected endpoints rather
    /// than refusing, see `upstream.rs`).
    ServiceUnavailable,
    GatewayTimeout(Timeout),
    /// No configuration snapshot has been applied yet.
    NotReady,
    /// An opaque token could not be introspected (the authorization server is unreachable,
    /// slow, or answered something that cannot be trusted): 503, never a pass.
    IntrospectionUnavailable,
}

/// The problem body's content type (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";
const BEARER_CHALLENGE: &str = r#"Bearer realm="portcullis""#;
// The `error_description`s are `JwtError::description()`'s two texts (a unit test checks they
// stay equal), spelled out so the header is a static value.
const BEARER_INVALID: &str =
    r#"Bearer realm="portcullis", error="invalid_token", error_description="the access token is invalid""#;
const BEARER_EXPIRED: &str =
    r#"Bearer realm="portcullis", error="invalid_token", error_description="the access token expired""#;
const BEARER_INSUFFICIENT_SCOPE: &str = r#"Bearer realm="portcullis", error="insufficient_scope""#;

impl Denial {
    pub fn reason_code(&self) -> Reason {
        match self {
            Denial::BadRequest(e) => Reason::of_path(e),
            Denial::InvalidRequest(_) => Reason::RequestInvalid,
            Denial::NotFound => Reason::RouteNotFound,
            Denial::MethodNotAllowed { .. } => Reason::MethodNotAllowed,
            Denial::Unauthorized(failure) => failure.reason(),
            Denial::InsufficientScope(d) => match d {
                ClaimDenial::ScopeMissing { .. } => Reason::ScopeMissing,
                ClaimDenial::ClaimMissing { .. } => Reason::ClaimMissing,
                ClaimDenial::ClaimMismatch { .. } => Reason::ClaimMismatch,
            },
            Denial::Forbidden(Forbidden::IpDenied) => Reason::IpDenied,
            Denial::Forbidden(Forbidden::IpNotAllowed) => Reason::IpNotAllowed,
            Denial::PayloadTooLarge => Reason::BodyTooLarge,
            Denial::HeadersTooLarge => Reason::HeadersTooLarge,
            Denial::BadGateway(BadGateway::ConnectFailed) => Reason::UpstreamConnectFailed,
            Denial::BadGateway(BadGateway::Reset) => Reason::UpstreamReset,
            Denial::BadGateway(BadGateway::TlsFailed) => Reason::UpstreamTlsFailed,
            Denial::ServiceUnavailable => Reason::UpstreamUnavailable,
            Denial::GatewayTimeout(Timeout::Connect) => Reason::UpstreamConnectTimeout,
            Denial::GatewayTimeout(Timeout::Request) => Reason::UpstreamTimeout,
            Denial::NotReady => Reason::NotReady,
            Denial::IntrospectionUnavailable => Reason::IntrospectionUnavailable,
        }
    }

    /// The stable snake_case name of this outcome (metrics, logs, audit).
    pub fn reason(&self) -> &'static str {
        self.reason_code().as_str()
    }

    pub fn status(&self) -> StatusCode {
        self.reason_code().status()
    }

    /// The one mapping from a denial to what the client sees. `request_id` is the validated or
    /// generated id of the request (visible ASCII, so it never breaks the JSON or a header).
    pub fn to_response(&self, request_id: Option<&HeaderValue>) -> Response<Full<Bytes>> {
        let (status, headers, body) = self.problem(request_id);
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }

    /// The parts of [`Denial::to_response`]: status, headers (no framing fields) and the
    /// problem document, for writers that are not hyper (the HTTP/1 engine).
    pub fn problem(&self, request_id: Option<&HeaderValue>) -> (StatusCode, HeaderMap, Bytes) {
        let status = self.status();
        let reason = self.reason_code();
        let title = status.canonical_reason().unwrap_or("Error");
        let id = request_id.and_then(|v| v.to_str().ok());
        let mut body = String::with_capacity(160 + id.map_or(0, str::len));
        body.push_str(r#"{"type":"about:blank","title":""#);
        body.push_str(title);
        body.push_str(r#"","status":"#);
        body.push_str(status.as_str());
        body.push_str(r#","detail":""#);
        body.push_str(reason.detail());
        body.push('"');
        if let Some(id) = id {
            body.push_str(r#","request_id":""#);
            push_json_escaped(&mut body, id);
            body.push('"');
        }
        body.push('}');

        let mut headers = HeaderMap::with_capacity(4);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            Denial::Unauthorized(AuthFailure::Missing | AuthFailure::Invalid(JwtError::Missing)) => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(BEARER_CHALLENGE));
            }
            Denial::Unauthorized(AuthFailure::Unverified) => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(BEARER_INVALID));
            }
            Denial::Unauthorized(AuthFailure::Invalid(e)) => {
                let challenge = if matches!(e, JwtError::Expired) { BEARER_EXPIRED } else { BEARER_INVALID };
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
            }
            Denial::InsufficientScope(_) => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(BEARER_INSUFFICIENT_SCOPE));
            }
            Denial::MethodNotAllowed { allow } => {
                // Method names only: always a valid header value.
                if let Ok(v) = HeaderValue::try_from(allow.to_string()) {
                    headers.insert(ALLOW, v);
                }
            }
            Denial::NotReady | Denial::ServiceUnavailable | Denial::IntrospectionUnavailable => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        (status, headers, Bytes::from(body))
    }
}

/// Request ids are visible ASCII; only `"` and `\` need escaping inside a JSON string.
fn push_json_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c < ' ' => {}
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn body_of(r: Response<Full<Bytes>>) -> serde_json::Value {
        let bytes = futures_body(r.into_body());
        serde_json::from_slice(&bytes).unwrap()
    }

    fn futures_body(b: Full<Bytes>) -> Bytes {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async { b.collect().await.unwrap().to_bytes() })
    }

    /// (denial, status, reason, extra header, its value)
    fn check(denial: Denial, status: u16, reason: &str, header: Option<(&str, &str)>) {
        let id = HeaderValue::from_static("req-1");
        let r = denial.to_response(Some(&id));
        assert_eq!(r.status().as_u16(), status, "{denial:?}");
        assert_eq!(denial.reason(), reason);
        assert_eq!(r.headers()[CONTENT_TYPE], PROBLEM_JSON);
        for name in [WWW_AUTHENTICATE, ALLOW, RETRY_AFTER] {
            let expected = header.filter(|(h, _)| *h == name.as_str()).map(|(_, v)| v);
            assert_eq!(r.headers().get(&name).map(|v| v.to_str().unwrap()), expected, "{denial:?} {name}");
        }
        let body = body_of(r);
        let obj = body.as_object().unwrap();
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 5, "{body}");
        assert_eq!(body["type"], "about:blank");
        assert_eq!(body["status"], status);
        assert_eq!(body["request_id"], "req-1");
        assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
        let detail = body["detail"].as_str().unwrap();
        // never internals: no addresses, ports, error sources, upstream names
        for leak in ["127.0.0.1", "os error", "hyper", "refused", "upstream \""] {
            assert!(!detail.contains(leak), "{detail}");
        }
    }

    #[test]
    fn denials_map_to_status_headers_and_problem_json() {
        let allow = MethodSet::of("GET").unwrap() | MethodSet::of("POST").unwrap();
        check(Denial::BadRequest(PathError::EncodedSlash), 400, "path_encoded_slash", None);
        check(Denial::BadRequest(PathError::Traversal), 400, "path_traversal", None);
        check(Denial::NotFound, 404, "route_not_found", None);
        check(Denial::MethodNotAllowed { allow }, 405, "method_not_allowed", Some(("allow", "GET, POST")));
        check(
            Denial::Unauthorized(AuthFailure::Missing),
            401,
            "token_missing",
            Some(("www-authenticate", r#"Bearer realm="portcullis""#)),
        );
        check(
            Denial::Unauthorized(AuthFailure::Unverified),
            401,
            "token_unverified",
            Some(("www-authenticate", BEARER_INVALID)),
        );
        check(
            Denial::Unauthorized(AuthFailure::Invalid(JwtError::SignatureInvalid)),
            401,
            "token_signature_invalid",
            Some(("www-authenticate", BEARER_INVALID)),
        );
        check(
            Denial::Unauthorized(AuthFailure::Invalid(JwtError::Expired)),
            401,
            "token_expired",
            Some(("www-authenticate", BEARER_EXPIRED)),
        );
        check(
            Denial::InsufficientScope(ClaimDenial::ScopeMissing { scope: "orders:write".into() }),
            403,
            "scope_missing",
            Some(("www-authenticate", r#"Bearer realm="portcullis", error="insufficient_scope""#)),
        );
        check(Denial::Forbidden(Forbidden::IpDenied), 403, "ip_denied", None);
        check(Denial::Forbidden(Forbidden::IpNotAllowed), 403, "ip_not_allowed", None);
        check(Denial::PayloadTooLarge, 413, "body_too_large", None);
        check(Denial::HeadersTooLarge, 431, "headers_too_large", None);
        check(Denial::InvalidRequest("both Transfer-Encoding and Content-Length"), 400, "request_invalid", None);
        check(Denial::BadGateway(BadGateway::ConnectFailed), 502, "upstream_connect_failed", None);
        check(Denial::BadGateway(BadGateway::Reset), 502, "upstream_reset", None);
        check(Denial::BadGateway(BadGateway::TlsFailed), 502, "upstream_tls_failed", None);
        check(Denial::ServiceUnavailable, 503, "upstream_unavailable", Some(("retry-after", "1")));
        check(Denial::GatewayTimeout(Timeout::Connect), 504, "upstream_connect_timeout", None);
        check(Denial::GatewayTimeout(Timeout::Request), 504, "upstream_timeout", None);
        check(Denial::NotReady, 503, "not_ready", Some(("retry-after", "1")));
        check(Denial::IntrospectionUnavailable, 503, "introspection_unavailable", Some(("retry-after", "1")));
        check(
            Denial::Unauthorized(AuthFailure::Invalid(JwtError::Inactive)),
            401,
            "token_inactive",
            Some(("www-authenticate", BEARER_INVALID)),
        );
    }

    #[test]
    fn token_and_claim_reasons_match_the_shared_vocabulary() {
        for e in [
            JwtError::Malformed("x"),
            JwtError::AlgNone,
            JwtError::AlgNotAllowed,
            JwtError::AlgKeyMismatch,
            JwtError::HeaderKeyForbidden("jku"),
            JwtError::CritUnsupported,
            JwtError::TypInvalid,
            JwtError::KidUnknown { kid: Some("k".into()) },
            JwtError::SignatureInvalid,
            JwtError::Expired,
            JwtError::NotYetValid,
            JwtError::TooOld,
            JwtError::IssuerMismatch,
            JwtError::AudienceMismatch,
            JwtError::ClaimInvalid("exp"),
            JwtError::Inactive,
        ] {
            let (reason, description) = (e.reason(), e.description());
            let d = Denial::Unauthorized(AuthFailure::Invalid(e));
            assert_eq!(d.reason(), reason);
            assert_eq!(d.status(), StatusCode::UNAUTHORIZED);
            let r = d.to_response(None);
            let challenge = r.headers()[WWW_AUTHENTICATE].to_str().unwrap();
            assert!(challenge.contains(r#"error="invalid_token""#), "{challenge}");
            assert!(challenge.ends_with(&format!(r#"error_description="{description}""#)), "{challenge}");
            assert_eq!(body_of(r)["detail"], description);
        }
        let missing = Denial::Unauthorized(AuthFailure::Invalid(JwtError::Missing));
        assert_eq!(missing.reason(), "token_missing");
        assert_eq!(missing.to_response(None).headers()[WWW_AUTHENTICATE], BEARER_CHALLENGE);
        for c in [
            ClaimDenial::ScopeMissing { scope: "s".into() },
            ClaimDenial::ClaimMissing { claim: "c".into() },
            ClaimDenial::ClaimMismatch { claim: "c".into() },
        ] {
            let reason = c.reason();
            let d = Denial::InsufficientScope(c);
            assert_eq!(d.reason(), reason);
            assert_eq!(d.status(), StatusCode::FORBIDDEN);
            let body = body_of(d.to_response(None)).to_string();
            assert!(!body.contains("\"s\"") && !body.contains("\"c\""), "names no scope or claim: {body}");
        }
    }

    #[test]
    fn path_reasons_match_the_shared_vocabulary() {
        for e in [
            PathError::NotAbsolute,
            PathError::TooLong { len: 1 },
            PathError::EncodedSlash,
            PathError::EncodedBackslash,
            PathError::Backslash,
            PathError::EncodedNul,
            PathError::EncodedControl,
            PathError::InvalidEncoding,
            PathError::InvalidUtf8,
            PathError::Traversal,
            PathError::InvalidCharacter,
        ] {
            let reason = e.reason();
            let d = Denial::BadRequest(e);
            assert_eq!(d.reason(), reason);
            assert_eq!(d.status(), StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn reasons_are_indexed_in_order_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
            assert!(seen.insert(r.as_str()));
        }
    }

    #[test]
    fn the_request_id_is_escaped_and_optional() {
        let id = HeaderValue::from_static(r#"a"b\c"#);
        let body = body_of(Denial::NotFound.to_response(Some(&id)));
        assert_eq!(body["request_id"], r#"a"b\c"#);
        let body = body_of(Denial::NotFound.to_response(None));
        assert!(body.get("request_id").is_none());
    }
}
