//! JWT (JWS compact) access-token verification, shared by the proxy and the upstream-side
//! claims-check library: a [`KeySet`] per issuer built from the control plane's Key resources (or a
//! shared secret), one precompiled [`Verifier`] per Issuer, and a bounded [`TokenCache`] of verified
//! tokens so a hot token costs a SHA-256 and a hash lookup instead of a signature check.
//!
//! What it does: parses the token itself with strict base64url (no padding, no standard alphabet,
//! no whitespace, no stray bits) and strict JSON (objects only, duplicate member names rejected at
//! every depth, UTF-8 only); takes the algorithm from the *key* (a JWK's `kty`/`crv`/`alg`) and
//! demands the header's `alg` equal it and be allowed by the issuer; checks `iss` exactly, `aud`,
//! `exp` (required), `nbf`, `iat` and the maximum token age with the issuer's clock skew, the
//! optional RFC 9068 `typ`, the JSON types of the claims it reads; then checks the signature with
//! the RustCrypto primitives (the very crates jsonwebtoken's `rust_crypto` backend uses), keys parsed
//! once per config version. Cheap claim checks run before the signature so a flood of expired or
//! foreign tokens costs no public-key operation; only a valid signature makes a token verified.
//!
//! What it must not do: trust the header to choose a key type or algorithm, fetch or use any key
//! named by the token (`jku`, `x5u`, `jwk`, `x5c` are rejected on sight), accept HMAC for an
//! issuer with asymmetric keys, use `kid` for anything but a map lookup, panic on any input, or keep
//! or print a raw token (the cache is keyed by its SHA-256; errors never carry it). Error
//! [`Display`](std::fmt::Display) text is for logs; clients get [`JwtError::description`] only.
//!
//! `kid`: a token without one is accepted only when the issuer's key set holds exactly one key (an
//! issuer in the middle of a rotation must send kids). A shared-secret issuer has one unnamed key
//! and ignores `kid`.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, Mac};
use ring::signature::{self as ring_sig, RsaPublicKeyComponents, UnparsedPublicKey};
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, RsaPublicKey};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::model::{self, Algorithm, KeySourceKind};

/// The longest token accepted, in bytes; anything longer is rejected before it is decoded.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// The longest `kid` accepted: it is only a map key, and it travels in [`JwtError::KidUnknown`].
pub const MAX_KID_LEN: usize = 256;
/// Largest NumericDate accepted (9999-12-31T23:59:59Z); larger `exp`/`nbf`/`iat` are invalid.
pub const MAX_NUMERIC_DATE: u64 = 253_402_300_799;
/// Smallest and largest RSA modulus accepted, in bits.
pub const RSA_MIN_BITS: usize = 2048;
pub const RSA_MAX_BITS: usize = 8192;
/// How long a token whose signature failed is remembered as bad by the [`TokenCache`].
pub const REJECTED_TTL: Duration = Duration::from_secs(300);

/// Strict base64url for the token's segments: URL-safe alphabet, no padding, no trailing bits.
const B64_STRICT: GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// JWK members are issuer-published: accept them padded or not (some servers pad), nothing else.
const B64_JWK: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

// ---------------------------------------------------------------- errors

/// Why a token was refused. [`JwtError::reason`] is the stable name used in metrics, audit and
/// logs; [`JwtError::description`] the generic text a client may see.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("no bearer token")]
    Missing,
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token algorithm is none, empty or missing")]
    AlgNone,
    #[error("token algorithm is not allowed for this issuer")]
    AlgNotAllowed,
    #[error("token algorithm differs from the one its key is for")]
    AlgKeyMismatch,
    #[error("token header carries a {0:?} member, which is never used")]
    HeaderKeyForbidden(&'static str),
    #[error("token header has a crit member")]
    CritUnsupported,
    #[error("token typ is not at+jwt")]
    TypInvalid,
    /// The kid (bounded by [`MAX_KID_LEN`]) is kept so the proxy can ask the control plane to
    /// refetch the issuer's keys; it is never part of the message.
    #[error("token key id is not in the issuer's key set")]
    KidUnknown { kid: Option<String> },
    #[error("token signature is invalid")]
    SignatureInvalid,
    #[error("token expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token is older than the issuer's maximum token age")]
    TooOld,
    #[error("token issuer does not match")]
    IssuerMismatch,
    #[error("token audience does not match")]
    AudienceMismatch,
    #[error("token claim {0:?} is missing or of the wrong type")]
    ClaimInvalid(&'static str),
    /// The authorization server's introspection says the (opaque) token is not active: unknown,
    /// revoked or expired there.
    #[error("token is not active at its issuer")]
    Inactive,
}

impl JwtError {
    /// Stable snake_case name, the same in metrics, audit events and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::Missing => "token_missing",
            JwtError::Malformed(_) => "token_malformed",
            JwtError::AlgNone => "token_alg_none",
            JwtError::AlgNotAllowed => "token_alg_not_allowed",
            JwtError::AlgKeyMismatch => "token_alg_key_mismatch",
            JwtError::HeaderKeyForbidden(_) => "token_header_key_forbidden",
            JwtError::CritUnsupported => "token_crit_unsupported",
            JwtError::TypInvalid => "token_typ_invalid",
            JwtError::KidUnknown { .. } => "token_kid_unknown",
            JwtError::SignatureInvalid => "token_signature_invalid",
            JwtError::Expired => "token_expired",
            JwtError::NotYetValid => "token_not_yet_valid",
            JwtError::TooOld => "token_too_old",
            JwtError::IssuerMismatch => "token_issuer_mismatch",
            JwtError::AudienceMismatch => "token_audience_mismatch",
            JwtError::ClaimInvalid(_) => "token_claim_invalid",
            JwtError::Inactive => "token_inactive",
        }
    }

    /// Text safe to show a client (RFC 6750 `error_description`): it names no key, claim or
    /// check. Only expiry is told apart, so well-behaved clients know to refresh.
    pub fn description(&self) -> &'static str {
        match self {
            JwtError::Missing => "a bearer token is required",
            JwtError::Expired => "the access token expired",
            _ => "the access token is invalid",
        }
    }
}

/// A key that could not be used; the rest of the set still works.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("key {key:?} (kid {kid:?}) of issuer {issuer:?} is not usable: {problem}")]
pub struct KeyError {
    pub issuer: String,
    /// The Key resource's name (empty for a shared secret).
    pub key: String,
    pub kid: String,
    pub problem: String,
}

// ---------------------------------------------------------------- bearer

/// Extracts the token from an `Authorization` header value (RFC 6750 §2.1). No header or another
/// scheme is [`JwtError::Missing`] (the client sent no bearer token); `Bearer` with nothing after
/// it is malformed.
pub fn bearer_token(authorization: Option<&str>) -> Result<&str, JwtError> {
    let value = authorization.ok_or(JwtError::Missing)?;
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(JwtError::Missing);
    }
    let token = rest.trim_matches(' ');
    if token.is_empty() {
        return Err(JwtError::Malformed("empty bearer token"));
    }
    Ok(token)
}

// ---------------------------------------------------------------- algorithms

/// A set of algorithms as a bit mask: a key allows one (or, for a shared secret, the issuer's HS*).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct AlgSet(u16);

impl AlgSet {
    fn of(algs: &[Algorithm]) -> AlgSet {
        AlgSet(algs.iter().fold(0, |m, a| m | bit(*a)))
    }
    fn contains(self, alg: Algorithm) -> bool {
        self.0 & bit(alg) != 0
    }
}

fn bit(alg: Algorithm) -> u16 {
    1 << (alg as u16)
}

fn is_rsa(alg: Algorithm) -> bool {
    use Algorithm::*;
    matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
}

fn hmac_len(alg: Algorithm) -> usize {
    match alg {
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => 32,
    }
}

// ---------------------------------------------------------------- keys

/// Parsed, validated key material: parsed once per config version, never per request. The
/// RustCrypto crates validate a key when the set is built; `ring` verifies signatures with it.
enum Material {
    /// Minimal big-endian `n` and `e` of a key the `rsa` crate accepted (and odd `n` and `e`).
    Rsa(RsaPublicKeyComponents<Box<[u8]>>),
    /// Uncompressed SEC1 point (0x04 || x || y) that `p256` accepted as on the curve.
    P256(UnparsedPublicKey<Box<[u8]>>),
    /// Uncompressed SEC1 point (0x04 || x || y) that `p384` accepted as on the curve.
    P384(UnparsedPublicKey<Box<[u8]>>),
    /// A 32-byte Ed25519 key that decompresses and is not of small order.
    Ed25519(UnparsedPublicKey<[u8; 32]>),
    Hmac(Box<[u8]>),
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Material::Rsa(_) => "Rsa",
            Material::P256(_) => "P256",
            Material::P384(_) => "P384",
            Material::Ed25519(_) => "Ed25519",
            Material::Hmac(_) => "Hmac(<secret>)",
        })
    }
}

impl Material {
    /// Checks `sig` over `input` with `alg`; the caller has already checked that the key allows
    /// `alg`, and any other pairing is false.
    fn verify(&self, alg: Algorithm, input: &[u8], sig: &[u8]) -> bool {
        use Algorithm::*;
        match (self, alg) {
            // the signature must be exactly as long as the modulus
            (Material::Rsa(k), RS256) => k.verify(&ring_sig::RSA_PKCS1_2048_8192_SHA256, input, sig).is_ok(),
            (Material::Rsa(k), RS384) => k.verify(&ring_sig::RSA_PKCS1_2048_8192_SHA384, input, sig).is_ok(),
            (Material::Rsa(k), RS512) => k.verify(&ring_sig::RSA_PKCS1_2048_8192_SHA512, input, sig).is_ok(),
            (Material::Rsa(k), PS256) => k.verify(&ring_sig::RSA_PSS_2048_8192_SHA256, input, sig).is_ok(),
            (Material::Rsa(k), PS384) => k.verify(&ring_sig::RSA_PSS_2048_8192_SHA384, input, sig).is_ok(),
            (Material::Rsa(k), PS512) => k.verify(&ring_sig::RSA_PSS_2048_8192_SHA512, input, sig).is_ok(),
            // the FIXED algorithms take only the 64/96-byte JOSE form (so DER is refused too) and
            // refuse r or s equal to 0 or ≥ n
            (Material::P256(k), ES256) | (Material::P384(k), ES384) => k.verify(input, sig).is_ok(),
            // strict: ring refuses a non-canonical S and compares R byte for byte with the
            // canonical encoding it computes; a small-order R is refused here (small-order keys
            // are refused when the set is built), as ed25519-dalek's verify_strict did
            (Material::Ed25519(k), EdDSA) => {
                sig.len() == 64
                    && !ED25519_SMALL_ORDER.iter().any(|p| sig[..32] == p[..])
                    && k.verify(input, sig).is_ok()
            }
            (Material::Hmac(secret), HS256) => hmac_ok::<Hmac<Sha256>>(secret, input, sig),
            (Material::Hmac(secret), HS384) => hmac_ok::<Hmac<Sha384>>(secret, input, sig),
            (Material::Hmac(secret), HS512) => hmac_ok::<Hmac<Sha512>>(secret, input, sig),
            _ => false,
        }
    }
}

/// The canonical encodings of the eight points of small order on edwards25519 (a non-canonical
/// encoding never equals the canonical one ring compares R with).
const ED25519_SMALL_ORDER: [[u8; 32]; 8] = [
    hex32("0100000000000000000000000000000000000000000000000000000000000000"),
    hex32("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    hex32("0000000000000000000000000000000000000000000000000000000000000000"),
    hex32("0000000000000000000000000000000000000000000000000000000000000080"),
    hex32("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    hex32("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85"),
    hex32("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    hex32("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"),
];

const fn hex32(s: &str) -> [u8; 32] {
    const fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not lowercase hex"),
        }
    }
    let s = s.as_bytes();
    assert!(s.len() == 64);
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = nibble(s[2 * i]) << 4 | nibble(s[2 * i + 1]);
        i += 1;
    }
    out
}

/// Constant-time HMAC comparison (`verify_slice`), which also refuses a wrong length.
fn hmac_ok<M: Mac + hmac::digest::KeyInit>(secret: &[u8], input: &[u8], sig: &[u8]) -> bool {
    match <M as Mac>::new_from_slice(secret) {
        Ok(mut mac) => {
            mac.update(input);
            mac.verify_slice(sig).is_ok()
        }
        Err(_) => false,
    }
}

#[derive(Debug)]
struct VerifyKey {
    kid: String,
    allowed: AlgSet,
    material: Material,
    /// Identity of (issuer, kid, algorithm, key material): a cached token is good only while a
    /// key with this fingerprint is in the set.
    fingerprint: u64,
}

/// The verification keys of one issuer, addressed by `kid`.
#[derive(Debug, Default)]
pub struct KeySet {
    by_kid: HashMap<String, VerifyKey>,
    /// The unnamed key of a shared-secret issuer.
    secret: Option<VerifyKey>,
}

impl KeySet {
    /// Builds the set from the issuer's Key resources: keys of another issuer, retired keys
    /// (`retire_at` ≤ `now`, skipped silently) and unusable keys are left out, the latter reported.
    /// A shared-secret issuer has no JWKs: every key is refused.
    pub fn from_jwks(issuer: &model::Issuer, keys: &[&model::Key], now: SystemTime) -> (KeySet, Vec<KeyError>) {
        let mut set = KeySet::default();
        let mut errors = Vec::new();
        let shared = matches!(issuer.keys.kind, KeySourceKind::SharedSecretFile(_));
        for key in keys {
            let fail = |problem: String| KeyError {
                issuer: issuer.name.clone(),
                key: key.name.clone(),
                kid: key.kid.clone(),
                problem,
            };
            if key.retire_at.is_some_and(|t| t <= now) {
                continue;
            }
            if key.issuer != issuer.name {
                errors.push(fail(format!("it belongs to issuer {:?}", key.issuer)));
                continue;
            }
            if shared {
                errors.push(fail("a shared-secret issuer accepts no JWKs".into()));
                continue;
            }
            if key.kid.is_empty() || key.kid.len() > MAX_KID_LEN {
                errors.push(fail(format!("kid must be 1 to {MAX_KID_LEN} bytes")));
                continue;
            }
            if set.by_kid.contains_key(&key.kid) {
                errors.push(fail("another key of the issuer has the same kid".into()));
                continue;
            }
            match key_from_jwk(issuer, &key.kid, &key.jwk) {
                Ok(k) => {
                    set.by_kid.insert(key.kid.clone(), k);
                }
                Err(problem) => errors.push(fail(problem)),
            }
        }
        (set, errors)
    }

    /// The key set of a shared-secret issuer (`keys.shared_secret_file`): the one secret, for the
    /// issuer's HS* algorithms, at least as long as the longest of their hashes (RFC 7518 §3.2).
    pub fn from_secret(issuer: &model::Issuer, secret: &[u8]) -> Result<KeySet, KeyError> {
        let fail =
            |problem: String| KeyError { issuer: issuer.name.clone(), key: String::new(), kid: String::new(), problem };
        if !matches!(issuer.keys.kind, KeySourceKind::SharedSecretFile(_)) {
            return Err(fail("the issuer is not configured with a shared secret".into()));
        }
        let hs: Vec<Algorithm> = issuer.algorithms.iter().copied().filter(|a| a.is_symmetric()).collect();
        if hs.is_empty() {
            return Err(fail("the issuer allows no HS* algorithm".into()));
        }
        let need = hs.iter().map(|a| hmac_len(*a)).max().unwrap_or(32);
        if secret.len() < need {
            return Err(fail(format!("the shared secret is {} bytes; at least {need} are required", secret.len())));
        }
        let fingerprint = fingerprint(&[b"hmac", issuer.name.as_bytes(), secret]);
        let key = VerifyKey {
            kid: String::new(),
            allowed: AlgSet::of(&hs),
            material: Material::Hmac(secret.into()),
            fingerprint,
        };
        Ok(KeySet { by_kid: HashMap::new(), secret: Some(key) })
    }

    pub fn len(&self) -> usize {
        self.by_kid.len() + usize::from(self.secret.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a key of this set verified under `kid` is still the same key.
    fn has_fingerprint(&self, fp: u64) -> bool {
        self.secret.iter().chain(self.by_kid.values()).any(|k| k.fingerprint == fp)
    }

    fn find(&self, kid: Option<&str>) -> Result<&VerifyKey, JwtError> {
        if let Some(k) = &self.secret {
            return Ok(k);
        }
        match kid {
            Some(kid) => self.by_kid.get(kid).ok_or_else(|| JwtError::KidUnknown { kid: Some(kid.to_owned()) }),
            None if self.by_kid.len() == 1 => self.by_kid.values().next().ok_or(JwtError::KidUnknown { kid: None }),
            None => Err(JwtError::KidUnknown { kid: None }),
        }
    }
}

fn fingerprint(parts: &[&[u8]]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        // length-prefixed, so ("ab","c") and ("a","bc") differ
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    u64::from_be_bytes(out)
}

fn jwk_str<'a>(jwk: &'a Map<String, Value>, member: &str) -> Result<&'a str, String> {
    match jwk.get(member) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("JWK member {member:?} is not a string")),
        None => Err(format!("JWK has no {member:?}")),
    }
}

fn jwk_bytes(jwk: &Map<String, Value>, member: &str) -> Result<Vec<u8>, String> {
    B64_JWK.decode(jwk_str(jwk, member)?).map_err(|_| format!("JWK member {member:?} is not base64url"))
}

/// One JWK → a verification key for exactly one algorithm: the JWK's `alg` if it has one, else the
/// one its curve implies, else (RSA) RS256 if the issuer allows it or the only RSA algorithm the
/// issuer allows. The algorithm must be among the issuer's.
fn key_from_jwk(issuer: &model::Issuer, kid: &str, jwk: &Value) -> Result<VerifyKey, String> {
    model::check_public_jwk(jwk)?;
    let obj = jwk.as_object().ok_or("a JWK must be a JSON object")?;
    match obj.get("use") {
        None => {}
        Some(Value::String(u)) if u == "sig" => {}
        Some(_) => return Err("JWK \"use\" is not \"sig\"".into()),
    }
    if let Some(ops) = obj.get("key_ops") {
        let verify = ops.as_array().is_some_and(|a| a.iter().any(|o| o.as_str() == Some("verify")));
        if !verify {
            return Err("JWK \"key_ops\" does not include \"verify\"".into());
        }
    }
    let jwk_alg = match obj.get("alg") {
        None => None,
        Some(Value::String(a)) if a == "Ed25519" => Some(Algorithm::EdDSA),
        Some(Value::String(a)) => Some(Algorithm::parse(a).ok_or_else(|| format!("JWK alg {a:?} is not supported"))?),
        Some(_) => return Err("JWK \"alg\" is not a string".into()),
    };
    let allowed = |a: Algorithm| issuer.algorithms.contains(&a);
    let kty = jwk_str(obj, "kty")?;
    let (alg, material, bytes): (Algorithm, Material, Vec<u8>) = match kty {
        "RSA" => {
            let n = jwk_bytes(obj, "n")?;
            let e = jwk_bytes(obj, "e")?;
            let key =
                RsaPublicKey::new_with_max_size(BigUint::from_bytes_be(&n), BigUint::from_bytes_be(&e), RSA_MAX_BITS)
                    .map_err(|e| format!("invalid RSA key: {e}"))?;
            let bits = key.n().bits();
            if bits < RSA_MIN_BITS {
                return Err(format!("RSA key has {bits} bits; at least {RSA_MIN_BITS} are required"));
            }
            // ring takes only odd n and e (an even one is no RSA key), minimally encoded
            let (n_min, e_min) = (key.n().to_bytes_be(), key.e().to_bytes_be());
            if n_min.last().is_none_or(|b| b & 1 == 0) {
                return Err("invalid RSA key: the modulus is even".into());
            }
            if e_min.last().is_none_or(|b| b & 1 == 0) {
                return Err("invalid RSA key: the public exponent is even".into());
            }
            let key = RsaPublicKeyComponents { n: n_min.into_boxed_slice(), e: e_min.into_boxed_slice() };
            let alg = match jwk_alg {
                Some(a) if is_rsa(a) => a,
                Some(a) => return Err(format!("JWK alg {a:?} does not fit an RSA key")),
                None if allowed(Algorithm::RS256) => Algorithm::RS256,
                None => {
                    let rsa: Vec<_> = issuer.algorithms.iter().copied().filter(|a| is_rsa(*a)).collect();
                    match rsa.as_slice() {
                        [one] => *one,
                        [] => return Err("the issuer allows no RSA algorithm".into()),
                        _ => return Err("the JWK has no alg and the issuer allows several RSA algorithms".into()),
                    }
                }
            };
            // length-prefixed so no other (n, e) pair gives the same bytes
            (alg, Material::Rsa(key), [&(n.len() as u64).to_be_bytes()[..], &n, &e].concat())
        }
        "EC" => {
            let crv = jwk_str(obj, "crv")?;
            let (alg, len) = match crv {
                "P-256" => (Algorithm::ES256, 32),
                "P-384" => (Algorithm::ES384, 48),
                other => return Err(format!("EC curve {other:?} is not supported")),
            };
            if jwk_alg.is_some_and(|a| a != alg) {
                return Err(format!("JWK alg does not fit curve {crv}"));
            }
            let (x, y) = (jwk_bytes(obj, "x")?, jwk_bytes(obj, "y")?);
            if x.len() != len || y.len() != len {
                return Err(format!("EC coordinates must be {len} bytes each"));
            }
            let sec1 = [&[4u8][..], &x, &y].concat();
            let point = sec1.clone().into_boxed_slice();
            let material = match alg {
                Algorithm::ES256 => {
                    p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).map_err(|_| "EC point is not on P-256")?;
                    Material::P256(UnparsedPublicKey::new(&ring_sig::ECDSA_P256_SHA256_FIXED, point))
                }
                _ => {
                    p384::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).map_err(|_| "EC point is not on P-384")?;
                    Material::P384(UnparsedPublicKey::new(&ring_sig::ECDSA_P384_SHA384_FIXED, point))
                }
            };
            (alg, material, sec1)
        }
        "OKP" => {
            let crv = jwk_str(obj, "crv")?;
            if crv != "Ed25519" {
                return Err(format!("OKP curve {crv:?} is not supported"));
            }
            if jwk_alg.is_some_and(|a| a != Algorithm::EdDSA) {
                return Err("JWK alg does not fit an Ed25519 key".into());
            }
            let x = jwk_bytes(obj, "x")?;
            let x: [u8; 32] = x.as_slice().try_into().map_err(|_| "Ed25519 key must be 32 bytes")?;
            let key = ed25519_dalek::VerifyingKey::from_bytes(&x).map_err(|_| "invalid Ed25519 key")?;
            if key.is_weak() {
                return Err("Ed25519 key is of small order".into());
            }
            (Algorithm::EdDSA, Material::Ed25519(UnparsedPublicKey::new(&ring_sig::ED25519, x)), x.to_vec())
        }
        other => return Err(format!("unsupported JWK kty {other:?}")),
    };
    if !allowed(alg) {
        return Err(format!("the key is for {alg:?}, which the issuer does not allow"));
    }
    let alg_name = format!("{alg:?}");
    let fingerprint = fingerprint(&[issuer.name.as_bytes(), kid.as_bytes(), alg_name.as_bytes(), &bytes]);
    Ok(VerifyKey { kid: kid.to_owned(), allowed: AlgSet::of(&[alg]), material, fingerprint })
}

// ---------------------------------------------------------------- parsing

/// A token whose structure and header passed the checks that need no configuration; nothing in
/// it is trusted yet. Use [`UnverifiedToken::issuer`] to pick the [`Verifier`].
#[derive(Clone, Debug)]
pub struct UnverifiedToken<'a> {
    /// `header.payload`, what the signature covers.
    signing_input: &'a str,
    signature: &'a str,
    alg: Algorithm,
    kid: Option<String>,
    typ: Option<String>,
    claims: Map<String, Value>,
}

impl UnverifiedToken<'_> {
    /// The unverified `iss` claim, if it is a string.
    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }
    pub fn alg(&self) -> Algorithm {
        self.alg
    }
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }
}

/// Parses a compact JWS: three segments, strict base64url, a JSON-object header whose `alg` is a
/// known algorithm, no `jwk`/`jku`/`x5u`/`x5c`/`crit`, and a JSON-object payload. This is the peek
/// at `iss` that lets the proxy choose among a policy's issuers without verifying twice.
pub fn parse(token: &str) -> Result<UnverifiedToken<'_>, JwtError> {
    if token.is_empty() {
        return Err(JwtError::Malformed("empty token"));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed("token too long"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed("not three dot-separated segments"));
    };
    let header = decode_object(h).ok_or(JwtError::Malformed("header is not a base64url JSON object"))?;
    let alg = match header.get("alg") {
        None => return Err(JwtError::AlgNone),
        Some(Value::String(a)) if a.is_empty() || a.eq_ignore_ascii_case("none") => return Err(JwtError::AlgNone),
        Some(Value::String(a)) => Algorithm::parse(a).ok_or(JwtError::AlgNotAllowed)?,
        Some(_) => return Err(JwtError::Malformed("alg is not a string")),
    };
    for member in ["jwk", "jku", "x5u", "x5c"] {
        if header.contains_key(member) {
            return Err(JwtError::HeaderKeyForbidden(member));
        }
    }
    // we implement no JWS extension, so any crit (even an empty or malformed one) is refused
    if header.contains_key("crit") {
        return Err(JwtError::CritUnsupported);
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) if k.len() <= MAX_KID_LEN => Some(k.clone()),
        Some(Value::String(_)) => return Err(JwtError::Malformed("kid too long")),
        Some(_) => return Err(JwtError::Malformed("kid is not a string")),
    };
    let typ = match header.get("typ") {
        None => None,
        Some(Value::String(t)) => Some(t.clone()),
        Some(_) => return Err(JwtError::TypInvalid),
    };
    let claims = decode_object(p).ok_or(JwtError::Malformed("payload is not a base64url JSON object"))?;
    // characters outside the alphabet (padding, whitespace, `+`/`/`) make the token malformed; a
    // signature that only decodes wrong (truncated, say) is a bad signature, found at verify
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(JwtError::Malformed("signature is not base64url"));
    }
    Ok(UnverifiedToken { signing_input: &token[..h.len() + 1 + p.len()], signature: s, alg, kid, typ, claims })
}

/// Strict base64url, then strict JSON; `None` unless the result is an object.
fn decode_object(segment: &str) -> Option<Map<String, Value>> {
    let bytes = B64_STRICT.decode(segment).ok()?;
    match serde_json::from_slice::<Strict>(&bytes).ok()?.0 {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// A JSON value deserialized with duplicate object member names refused at every depth: two
/// `alg`s or two `sub`s are how one parser is made to read a different token than another.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("non-finite number"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(de::Error::custom("duplicate member name"));
            }
            let Strict(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

// ---------------------------------------------------------------- verifier

/// A token that passed every check of its issuer.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedToken {
    /// All claims of the payload.
    pub claims: Map<String, Value>,
    pub sub: Option<String>,
    /// `client_id` (RFC 9068), else `azp`.
    pub client_id: Option<String>,
    pub jti: Option<String>,
    /// `scope` (space-separated string), else `scp` (array of strings, or a space-separated string).
    pub scopes: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    pub iat: Option<u64>,
    /// The kid of the key that verified it (empty for a shared secret).
    pub kid: String,
    pub alg: Algorithm,
    /// The Issuer resource's name (not `iss`).
    pub issuer: String,
}

/// Verifies tokens of one Issuer: its config and key set, compiled once per config version.
#[derive(Debug)]
pub struct Verifier {
    name: String,
    iss: String,
    audiences: Vec<String>,
    allowed: AlgSet,
    skew: u64,
    max_age: Option<u64>,
    require_at_jwt: bool,
    keys: KeySet,
    /// Identity of everything above but the keys; equal across config versions that did not
    /// change the issuer, so a config push does not empty the token cache.
    fingerprint: u64,
}

impl AsRef<Verifier> for Verifier {
    fn as_ref(&self) -> &Verifier {
        self
    }
}

impl Verifier {
    /// `keys` must be the issuer's own ([`KeySet::from_jwks`] or [`KeySet::from_secret`]).
    pub fn new(issuer: &model::Issuer, keys: KeySet) -> Verifier {
        let skew = issuer.clock_skew.as_secs();
        let max_age = issuer.max_token_age.map(|d| d.as_secs());
        let algs: Vec<String> = issuer.algorithms.iter().map(|a| format!("{a:?}")).collect();
        let fingerprint = fingerprint(&[
            issuer.name.as_bytes(),
            issuer.issuer.as_bytes(),
            issuer.audiences.join("\n").as_bytes(),
            algs.join(",").as_bytes(),
            &skew.to_be_bytes(),
            &max_age.map_or([0xff; 8], u64::to_be_bytes),
            &[u8::from(issuer.require_at_jwt)],
        ]);
        Verifier {
            name: issuer.name.clone(),
            iss: issuer.issuer.clone(),
            audiences: issuer.audiences.clone(),
            allowed: AlgSet::of(&issuer.algorithms),
            skew,
            max_age,
            require_at_jwt: issuer.require_at_jwt,
            keys,
            fingerprint,
        }
    }

    /// The Issuer resource's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `iss` value this verifier accepts.
    pub fn iss(&self) -> &str {
        &self.iss
    }

    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// Parses and verifies `token` at `now`.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<VerifiedToken, JwtError> {
        self.verify_parsed(parse(token)?, now)
    }

    /// Verifies a token already [`parse`]d (to read its `iss`).
    pub fn verify_parsed(&self, token: UnverifiedToken<'_>, now: SystemTime) -> Result<VerifiedToken, JwtError> {
        self.check(token, now).map(|(t, _)| t).map_err(|(e, _)| e)
    }

    /// The checks, in order of cost; on success also the fingerprint of the key that verified, on
    /// a bad signature the fingerprint of the key that refused it (both for the cache).
    fn check(&self, token: UnverifiedToken<'_>, now: SystemTime) -> Result<(VerifiedToken, u64), (JwtError, u64)> {
        let plain = |e: JwtError| (e, 0);
        if !self.allowed.contains(token.alg) {
            return Err(plain(JwtError::AlgNotAllowed));
        }
        let key = self.keys.find(token.kid.as_deref()).map_err(plain)?;
        if !key.allowed.contains(token.alg) {
            return Err(plain(JwtError::AlgKeyMismatch));
        }
        if self.require_at_jwt {
            let at = token
                .typ
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("application/at+jwt"));
            if !at {
                return Err(plain(JwtError::TypInvalid));
            }
        }
        let claims = self.check_claims(&token.claims, unix_secs(now)).map_err(plain)?;
        let signature_ok = B64_STRICT
            .decode(token.signature)
            .is_ok_and(|sig| key.material.verify(token.alg, token.signing_input.as_bytes(), &sig));
        if !signature_ok {
            return Err((JwtError::SignatureInvalid, key.fingerprint));
        }
        let Claims { exp, iat, sub, client_id, jti, scopes } = claims;
        let verified = VerifiedToken {
            claims: token.claims,
            sub,
            client_id,
            jti,
            scopes,
            exp,
            iat,
            kid: key.kid.clone(),
            alg: token.alg,
            issuer: self.name.clone(),
        };
        Ok((verified, key.fingerprint))
    }

    fn check_claims(&self, claims: &Map<String, Value>, now: u64) -> Result<Claims, JwtError> {
        match claims.get("iss") {
            Some(Value::String(iss)) if *iss == self.iss => {}
            Some(Value::String(_)) | None => return Err(JwtError::IssuerMismatch),
            Some(_) => return Err(JwtError::ClaimInvalid("iss")),
        }
        let ours = |a: &str| self.audiences.iter().any(|x| x == a);
        let aud_ok = match claims.get("aud") {
            None => false,
            Some(Value::String(a)) => ours(a),
            Some(Value::Array(list)) => {
                let mut hit = false;
                for a in list {
                    let a = a.as_str().ok_or(JwtError::ClaimInvalid("aud"))?;
                    hit |= ours(a);
                }
                hit
            }
            Some(_) => return Err(JwtError::ClaimInvalid("aud")),
        };
        if !aud_ok {
            return Err(JwtError::AudienceMismatch);
        }
        let exp = claims.get("exp").and_then(numeric_date).ok_or(JwtError::ClaimInvalid("exp"))?;
        let nbf = optional(claims, "nbf", numeric_date)?;
        let iat = optional(claims, "iat", numeric_date)?;
        let skew = self.skew;
        // valid while now < exp + skew (RFC 7519 §4.1.4, with leeway)
        if now >= exp.saturating_add(skew) {
            return Err(JwtError::Expired);
        }
        if nbf.is_some_and(|nbf| nbf > now.saturating_add(skew))
            || iat.is_some_and(|iat| iat > now.saturating_add(skew))
        {
            return Err(JwtError::NotYetValid);
        }
        if let Some(max_age) = self.max_age {
            let iat = iat.ok_or(JwtError::ClaimInvalid("iat"))?;
            if now > iat.saturating_add(max_age).saturating_add(skew) {
                return Err(JwtError::TooOld);
            }
        }
        let sub = optional(claims, "sub", string)?;
        let jti = optional(claims, "jti", string)?;
        let client_id = match optional(claims, "client_id", string)? {
            Some(c) => Some(c),
            None => optional(claims, "azp", string)?,
        };
        let scopes = match (claims.get("scope"), claims.get("scp")) {
            (Some(Value::String(s)), _) | (None, Some(Value::String(s))) => {
                s.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect()
            }
            (None, Some(Value::Array(list))) => list
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or(JwtError::ClaimInvalid("scp"))?,
            (None, None) => Vec::new(),
            (Some(_), _) => return Err(JwtError::ClaimInvalid("scope")),
            (None, Some(_)) => return Err(JwtError::ClaimInvalid("scp")),
        };
        Ok(Claims { exp, iat, sub, client_id, jti, scopes })
    }
}

struct Claims {
    exp: u64,
    iat: Option<u64>,
    sub: Option<String>,
    client_id: Option<String>,
    jti: Option<String>,
    scopes: Vec<String>,
}

/// A present claim must have the right type; an absent one is `None`.
fn optional<T>(
    claims: &Map<String, Value>,
    name: &'static str,
    f: fn(&Value) -> Option<T>,
) -> Result<Option<T>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => f(v).map(Some).ok_or(JwtError::ClaimInvalid(name)),
    }
}

fn string(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

/// RFC 7519 NumericDate: a JSON number of seconds, not negative, not past [`MAX_NUMERIC_DATE`];
/// fractions are truncated. Strings, booleans and null are not dates.
fn numeric_date(v: &Value) -> Option<u64> {
    let Value::Number(n) = v else { return None };
    let secs = match n.as_u64() {
        Some(u) => u,
        None => {
            let f = n.as_f64()?;
            // also false for NaN; the upper bound keeps the cast exact
            if !(0.0..=MAX_NUMERIC_DATE as f64).contains(&f) {
                return None;
            }
            f as u64
        }
    };
    (secs <= MAX_NUMERIC_DATE).then_some(secs)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------- introspection

/// How long after its `iat` an RFC 9701 introspection response is still taken as fresh (on top
/// of the issuer's clock skew). The proxy asks for it and uses it at once; an older one is a
/// replay or a badly skewed clock.
pub const INTROSPECTION_RESPONSE_MAX_AGE: u64 = 300;

/// Why an introspection answer was not accepted: the answer itself could not be trusted
/// (signature, type, audience of the response) — a fault between the proxy and the
/// authorization server, not the client's — or the token it describes is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IntrospectionError {
    #[error("introspection response refused: {0}")]
    Response(JwtError),
    #[error(transparent)]
    Token(JwtError),
}

impl Verifier {
    /// An RFC 9701 introspection response (`application/token-introspection+jwt`): a JWT signed by
    /// this issuer's keys, `typ` `token-introspection+jwt`, `iss` the issuer, `aud` the
    /// introspecting client (`client_id`), a fresh `iat`, and the RFC 7662 answer in its
    /// `token_introspection` claim. The answer must say `active: true` and pass the same claim
    /// rules as a JWT access token of this issuer (iss, aud, exp, nbf, iat, max age). The
    /// verified token's claims are the answer's.
    pub fn verify_introspection_jwt(
        &self,
        response: &str,
        client_id: &str,
        now: SystemTime,
    ) -> Result<VerifiedToken, IntrospectionError> {
        let bad = IntrospectionError::Response;
        let token = parse(response).map_err(bad)?;
        if !self.allowed.contains(token.alg) {
            return Err(bad(JwtError::AlgNotAllowed));
        }
        let key = self.keys.find(token.kid.as_deref()).map_err(bad)?;
        if !key.allowed.contains(token.alg) {
            return Err(bad(JwtError::AlgKeyMismatch));
        }
        let typ_ok = token.typ.as_deref().is_some_and(|t| {
            t.eq_ignore_ascii_case("token-introspection+jwt")
                || t.eq_ignore_ascii_case("application/token-introspection+jwt")
        });
        if !typ_ok {
            return Err(bad(JwtError::TypInvalid));
        }
        match token.claims.get("iss") {
            Some(Value::String(iss)) if *iss == self.iss => {}
            _ => return Err(bad(JwtError::IssuerMismatch)),
        }
        let aud_ok = match token.claims.get("aud") {
            Some(Value::String(a)) => a == client_id,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(client_id)),
            _ => false,
        };
        if !aud_ok {
            return Err(bad(JwtError::AudienceMismatch));
        }
        let secs = unix_secs(now);
        let iat = token.claims.get("iat").and_then(numeric_date).ok_or(bad(JwtError::ClaimInvalid("iat")))?;
        if iat > secs.saturating_add(self.skew) {
            return Err(bad(JwtError::NotYetValid));
        }
        if secs > iat.saturating_add(INTROSPECTION_RESPONSE_MAX_AGE).saturating_add(self.skew) {
            return Err(bad(JwtError::TooOld));
        }
        let signature_ok = B64_STRICT
            .decode(token.signature)
            .is_ok_and(|sig| key.material.verify(token.alg, token.signing_input.as_bytes(), &sig));
        if !signature_ok {
            return Err(bad(JwtError::SignatureInvalid));
        }
        let mut claims = token.claims;
        let Some(Value::Object(answer)) = claims.remove("token_introspection") else {
            return Err(bad(JwtError::ClaimInvalid("token_introspection")));
        };
        self.accept_introspection(answer, key.kid.clone(), token.alg, now)
    }

    /// A plain RFC 7662 JSON answer. It carries no signature: it is trusted because the proxy
    /// fetched it itself, from the configured endpoint, authenticated as the issuer's client.
    pub fn accept_introspection_json(&self, body: &[u8], now: SystemTime) -> Result<VerifiedToken, IntrospectionError> {
        let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(body) else {
            return Err(IntrospectionError::Response(JwtError::Malformed(
                "introspection response is not a JSON object",
            )));
        };
        self.accept_introspection(answer, String::new(), Algorithm::RS256, now)
    }

    fn accept_introspection(
        &self,
        answer: Map<String, Value>,
        kid: String,
        alg: Algorithm,
        now: SystemTime,
    ) -> Result<VerifiedToken, IntrospectionError> {
        match answer.get("active") {
            Some(Value::Bool(true)) => {}
            Some(Value::Bool(false)) => return Err(IntrospectionError::Token(JwtError::Inactive)),
            _ => return Err(IntrospectionError::Response(JwtError::ClaimInvalid("active"))),
        }
        let Claims { exp, iat, sub, client_id, jti, scopes } =
            self.check_claims(&answer, unix_secs(now)).map_err(IntrospectionError::Token)?;
        Ok(VerifiedToken { claims: answer, sub, client_id, jti, scopes, exp, iat, kid, alg, issuer: self.name.clone() })
    }
}

// ---------------------------------------------------------------- cache

/// Bounded cache of verification outcomes, keyed by the SHA-256 of the token (never the token).
///
/// An accepted entry lives until the token's `exp` (never later, skew or not), or `iat` + the
/// maximum token age; a token whose signature failed is remembered as bad for [`REJECTED_TTL`] (a
/// signature check is the expensive part of a refusal, and its outcome cannot change while the key
/// is the same). Every entry records the fingerprint of the issuer config and of the key that
/// decided it: it is used only while a verifier with that config still holds that key, so a key
/// removed or replaced (or an issuer reconfigured) voids its entries at once, while adding a key
/// or pushing an unchanged config keeps the cache warm. Void entries are dropped when met or
/// evicted. Sharded, one std `Mutex` per shard held for a hash lookup only, CLOCK eviction (an entry
/// hit since the hand last passed survives one more round), so a flood of new tokens displaces cold
/// entries before hot ones.
pub struct TokenCache {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    pick: RandomState,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").field("shards", &self.shards.len()).field("per_shard", &self.per_shard).finish()
    }
}

#[derive(Default)]
struct Shard {
    index: HashMap<[u8; 32], usize>,
    slots: Vec<Slot>,
    hand: usize,
}

struct Slot {
    key: [u8; 32],
    entry: Entry,
    referenced: bool,
}

#[derive(Clone)]
struct Entry {
    /// `None`: the signature was refused.
    token: Option<Arc<VerifiedToken>>,
    /// Unix seconds; the entry is void from then on.
    until: u64,
    verifier: u64,
    key: u64,
}

impl TokenCache {
    /// A cache of at most `capacity` tokens (at least one per shard).
    pub fn new(capacity: usize) -> TokenCache {
        let shards = (capacity / 64).clamp(1, 16).next_power_of_two();
        let per_shard = capacity.div_ceil(shards).max(1);
        TokenCache {
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard,
            pick: RandomState::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.per_shard * self.shards.len()
    }

    /// Number of entries, void ones included until they are met.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).slots.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Verifies `token` against the one of `verifiers` (a policy's accepted issuers) whose `iss` it
    /// names, answering from the cache when it can and remembering the outcome.
    pub fn verify<V: AsRef<Verifier>>(
        &self,
        verifiers: &[V],
        token: &str,
        now: SystemTime,
    ) -> Result<Arc<VerifiedToken>, JwtError> {
        let digest = digest(token);
        let now_secs = unix_secs(now);
        if let Some(hit) = self.lookup(&digest, now_secs, verifiers) {
            return hit;
        }
        let parsed = parse(token)?;
        let iss = parsed.issuer().ok_or(JwtError::IssuerMismatch)?;
        let mut candidates = verifiers.iter().map(AsRef::as_ref).filter(|v| v.iss == iss);
        let first = candidates.next().ok_or(JwtError::IssuerMismatch)?;
        // Two Issuer resources may share an `iss` (say, with other audiences): the first that
        // accepts the token wins; the first one's error is the answer.
        let mut result = self.check_and_remember(first, parsed.clone(), &digest, now_secs, now);
        for v in candidates {
            if result.is_ok() {
                break;
            }
            if let ok @ Ok(_) = self.check_and_remember(v, parsed.clone(), &digest, now_secs, now) {
                result = ok;
            }
        }
        result
    }

    /// A cached outcome of `token` still valid for `verifier` at `now`.
    pub fn get(
        &self,
        verifier: &Verifier,
        token: &str,
        now: SystemTime,
    ) -> Option<Result<Arc<VerifiedToken>, JwtError>> {
        self.lookup(&digest(token), unix_secs(now), std::slice::from_ref(verifier))
    }

    /// Remembers a token `verifier` accepted at `now` (a no-op if the key that verified it is gone
    /// or the token is already past its cache lifetime).
    pub fn insert(&self, verifier: &Verifier, token: &str, verified: Arc<VerifiedToken>, now: SystemTime) {
        let Ok(key) = verifier.keys.find(Some(&verified.kid)) else { return };
        let (until, now) = (accepted_until(verifier, &verified), unix_secs(now));
        if until > now {
            let entry = Entry { token: Some(verified), until, verifier: verifier.fingerprint, key: key.fingerprint };
            self.store(digest(token), entry, now);
        }
    }

    /// Drops every entry no verifier in `current` can use any more: call after a config swap,
    /// off the request path, to free memory early (lookups ignore such entries anyway).
    pub fn retain_current<V: AsRef<Verifier>>(&self, current: &[V]) {
        for shard in self.shards.iter() {
            let mut s = lock(shard);
            let mut i = 0;
            while i < s.slots.len() {
                if usable(&s.slots[i].entry, current) {
                    i += 1;
                } else {
                    s.remove(i);
                }
            }
        }
    }

    fn check_and_remember(
        &self,
        v: &Verifier,
        token: UnverifiedToken<'_>,
        digest: &[u8; 32],
        now_secs: u64,
        now: SystemTime,
    ) -> Result<Arc<VerifiedToken>, JwtError> {
        match v.check(token, now) {
            Ok((verified, key)) => {
                let verified = Arc::new(verified);
                let until = accepted_until(v, &verified);
                if until > now_secs {
                    let entry = Entry { token: Some(verified.clone()), until, verifier: v.fingerprint, key };
                    self.store(*digest, entry, now_secs);
                }
                Ok(verified)
            }
            Err((JwtError::SignatureInvalid, key)) => {
                let until = now_secs.saturating_add(REJECTED_TTL.as_secs());
                self.store(*digest, Entry { token: None, until, verifier: v.fingerprint, key }, now_secs);
                Err(JwtError::SignatureInvalid)
            }
            Err((e, _)) => Err(e),
        }
    }

    fn shard(&self, digest: &[u8; 32]) -> &Mutex<Shard> {
        let h = self.pick.hash_one(digest) as usize;
        &self.shards[h & (self.shards.len() - 1)]
    }

    fn lookup<V: AsRef<Verifier>>(
        &self,
        digest: &[u8; 32],
        now: u64,
        verifiers: &[V],
    ) -> Option<Result<Arc<VerifiedToken>, JwtError>> {
        let mut s = lock(self.shard(digest));
        let i = *s.index.get(digest)?;
        if s.slots[i].entry.until <= now {
            s.remove(i);
            return None;
        }
        let slot = &mut s.slots[i];
        if !usable(&slot.entry, verifiers) {
            // void for these verifiers; another policy's may still use it, so keep it
            return None;
        }
        slot.referenced = true;
        Some(slot.entry.token.clone().ok_or(JwtError::SignatureInvalid))
    }

    fn store(&self, digest: [u8; 32], entry: Entry, now: u64) {
        let mut s = lock(self.shard(&digest));
        if let Some(&i) = s.index.get(&digest) {
            s.slots[i].entry = entry;
            return;
        }
        if s.slots.len() < self.per_shard {
            let i = s.slots.len();
            s.slots.push(Slot { key: digest, entry, referenced: false });
            s.index.insert(digest, i);
            return;
        }
        let victim = s.clock_victim(now);
        let old = std::mem::replace(&mut s.slots[victim], Slot { key: digest, entry, referenced: false });
        s.index.remove(&old.key);
        s.index.insert(digest, victim);
    }
}

impl Shard {
    /// CLOCK: the first slot from the hand that is expired or not referenced since the hand last
    /// passed it; at most two rounds.
    fn clock_victim(&mut self, now: u64) -> usize {
        let n = self.slots.len().max(1);
        for _ in 0..2 * n {
            let i = self.hand % n;
            self.hand = (i + 1) % n;
            let slot = &mut self.slots[i];
            if slot.entry.until <= now || !slot.referenced {
                return i;
            }
            slot.referenced = false;
        }
        self.hand
    }

    fn remove(&mut self, i: usize) {
        let old = self.slots.swap_remove(i);
        self.index.remove(&old.key);
        if let Some(moved) = self.slots.get(i) {
            self.index.insert(moved.key, i);
        }
        if self.hand >= self.slots.len() {
            self.hand = 0;
        }
    }
}

fn usable<V: AsRef<Verifier>>(entry: &Entry, verifiers: &[V]) -> bool {
    verifiers.iter().map(AsRef::as_ref).any(|v| v.fingerprint == entry.verifier && v.keys.has_fingerprint(entry.key))
}

/// Until when a cache may answer for an accepted token: `exp` at the latest.
fn accepted_until(v: &Verifier, t: &VerifiedToken) -> u64 {
    match (v.max_age, t.iat) {
        (Some(max_age), Some(iat)) => t.exp.min(iat.saturating_add(max_age)),
        _ => t.exp,
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // a panic while holding a shard cannot leave it inconsistent in a way that matters more than
    // losing the cache; keep serving
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Issuer, Key, KeySource};
    use ed25519_dalek::Signer as _;
    use serde_json::json;

    const T0: u64 = 1_700_000_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn issuer(kind: KeySourceKind, algorithms: &[Algorithm]) -> Issuer {
        Issuer {
            name: "idp".into(),
            issuer: "https://idp.test/".into(),
            audiences: vec!["api://orders".into()],
            algorithms: algorithms.to_vec(),
            clock_skew: Duration::from_secs(60),
            max_token_age: None,
            keys: KeySource { kind, refresh_interval: Duration::from_secs(300) },
            introspection: None,
            require_at_jwt: false,
        }
    }

    fn ed_issuer() -> Issuer {
        issuer(KeySourceKind::Inline(String::new()), &[Algorithm::EdDSA])
    }

    #[test]
    fn ed25519_small_order_table_is_the_eight_canonical_small_order_points() {
        let mut seen = std::collections::HashSet::new();
        for p in ED25519_SMALL_ORDER {
            let point = ed25519_dalek::VerifyingKey::from_bytes(&p).expect("decompresses");
            assert!(point.is_weak(), "{p:02x?} is not of small order");
            assert_eq!(point.to_bytes(), p, "{p:02x?} is not canonical");
            assert!(seen.insert(p));
        }
        assert_eq!(seen.len(), 8);
    }

    fn ed_key(seed: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
    }

    fn jwk_key(kid: &str, sk: &ed25519_dalek::SigningKey) -> Key {
        let x = B64_STRICT.encode(sk.verifying_key().as_bytes());
        Key {
            name: format!("idp-{kid}"),
            issuer: "idp".into(),
            kid: kid.into(),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid}),
            retire_at: None,
        }
    }

    fn verifier(iss: &Issuer, keys: &[Key]) -> Verifier {
        let refs: Vec<&Key> = keys.iter().collect();
        let (set, errors) = KeySet::from_jwks(iss, &refs, at(T0));
        assert_eq!(errors, vec![]);
        Verifier::new(iss, set)
    }

    fn sign_ed(sk: &ed25519_dalek::SigningKey, kid: &str, claims: Value) -> String {
        let h = B64_STRICT.encode(json!({"alg": "EdDSA", "kid": kid}).to_string());
        let p = B64_STRICT.encode(claims.to_string());
        let sig = sk.sign(format!("{h}.{p}").as_bytes()).to_bytes();
        format!("{h}.{p}.{}", B64_STRICT.encode(sig))
    }

    fn claims(exp: u64) -> Value {
        json!({"iss": "https://idp.test/", "aud": "api://orders", "sub": "alice", "exp": exp, "iat": T0})
    }

    #[test]
    fn cache_hit_until_exp_not_later() {
        let sk = ed_key(1);
        let v = verifier(&ed_issuer(), &[jwk_key("a", &sk)]);
        let cache = TokenCache::new(128);
        let token = sign_ed(&sk, "a", claims(T0 + 100));
        let first = cache.verify(&[&v], &token, at(T0)).unwrap();
        assert_eq!(cache.len(), 1);
        let hit = cache.verify(&[&v], &token, at(T0 + 99)).unwrap();
        assert!(Arc::ptr_eq(&first, &hit), "second verify is a cache hit");
        // at exp the entry is void, though verify still accepts within the 60 s skew
        assert!(cache.get(&v, &token, at(T0 + 100)).is_none());
        assert_eq!(cache.len(), 0);
        let again = cache.verify(&[&v], &token, at(T0 + 130)).unwrap();
        assert!(!Arc::ptr_eq(&first, &again));
        assert_eq!(cache.len(), 0, "a token past exp is not cached");
        assert_eq!(cache.verify(&[&v], &token, at(T0 + 160)).unwrap_err(), JwtError::Expired);
    }

    #[test]
    fn cache_honours_max_token_age() {
        let sk = ed_key(1);
        let mut iss = ed_issuer();
        iss.max_token_age = Some(Duration::from_secs(30));
        let v = verifier(&iss, &[jwk_key("a", &sk)]);
        let cache = TokenCache::new(128);
        let token = sign_ed(&sk, "a", claims(T0 + 1000));
        cache.verify(&[&v], &token, at(T0)).unwrap();
        assert!(cache.get(&v, &token, at(T0 + 29)).is_some());
        assert!(cache.get(&v, &token, at(T0 + 30)).is_none());
    }

    #[test]
    fn removed_or_replaced_key_voids_entries_added_key_does_not() {
        let (a, b, c) = (ed_key(1), ed_key(2), ed_key(3));
        let iss = ed_issuer();
        let v1 = verifier(&iss, &[jwk_key("a", &a), jwk_key("b", &b)]);
        let cache = TokenCache::new(128);
        let token = sign_ed(&a, "a", claims(T0 + 3600));
        let first = cache.verify(&[&v1], &token, at(T0)).unwrap();

        // config push that adds a key: the entry stays good
        let v2 = verifier(&iss, &[jwk_key("a", &a), jwk_key("b", &b), jwk_key("c", &c)]);
        assert!(Arc::ptr_eq(&first, &cache.verify(&[&v2], &token, at(T0 + 1)).unwrap()));

        // key "a" removed: no hit, and verify says why
        let v3 = verifier(&iss, &[jwk_key("b", &b)]);
        assert!(cache.get(&v3, &token, at(T0 + 1)).is_none());
        assert_eq!(cache.verify(&[&v3], &token, at(T0 + 1)).unwrap_err().reason(), "token_kid_unknown");

        // kid "a" now names another key: no hit, signature refused
        let v4 = verifier(&iss, &[jwk_key("a", &c)]);
        assert!(cache.get(&v4, &token, at(T0 + 1)).is_none());
        assert_eq!(cache.verify(&[&v4], &token, at(T0 + 1)).unwrap_err(), JwtError::SignatureInvalid);

        // issuer reconfigured (another audience): no hit
        let mut iss5 = iss.clone();
        iss5.audiences = vec!["api://billing".into()];
        let v5 = verifier(&iss5, &[jwk_key("a", &a)]);
        assert_eq!(cache.verify(&[&v5], &token, at(T0 + 1)).unwrap_err(), JwtError::AudienceMismatch);

        // retain_current drops what no current verifier can use
        cache.retain_current(&[&v3]);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn entry_of_one_issuer_is_no_hit_for_another() {
        let sk = ed_key(1);
        let a = verifier(&ed_issuer(), &[jwk_key("a", &sk)]);
        let mut other = ed_issuer();
        other.name = "other".into();
        other.issuer = "https://other.test/".into();
        let b = verifier(&other, &[Key { issuer: "other".into(), ..jwk_key("a", &sk) }]);
        let cache = TokenCache::new(128);
        let token = sign_ed(&sk, "a", claims(T0 + 3600));
        cache.verify(&[&a], &token, at(T0)).unwrap();
        assert_eq!(cache.verify(&[&b], &token, at(T0)).unwrap_err(), JwtError::IssuerMismatch);
        // a policy accepting both finds the entry
        assert_eq!(cache.verify(&[&b, &a], &token, at(T0)).unwrap().issuer, "idp");
    }

    #[test]
    fn bad_signature_is_remembered() {
        let (a, evil) = (ed_key(1), ed_key(9));
        let v = verifier(&ed_issuer(), &[jwk_key("a", &a)]);
        let cache = TokenCache::new(128);
        let forged = sign_ed(&evil, "a", claims(T0 + 3600));
        assert_eq!(cache.verify(&[&v], &forged, at(T0)).unwrap_err(), JwtError::SignatureInvalid);
        assert_eq!(cache.get(&v, &forged, at(T0 + 1)), Some(Err(JwtError::SignatureInvalid)));
        assert!(cache.get(&v, &forged, at(T0 + REJECTED_TTL.as_secs())).is_none());
        // other failures are cheap and are not cached
        let expired = sign_ed(&a, "a", claims(T0 - 3600));
        assert_eq!(cache.verify(&[&v], &expired, at(T0)).unwrap_err(), JwtError::Expired);
        assert!(cache.get(&v, &expired, at(T0)).is_none());
    }

    #[test]
    fn cache_is_bounded_and_clock_keeps_hot_entries() {
        let sk = ed_key(1);
        let v = verifier(&ed_issuer(), &[jwk_key("a", &sk)]);
        let cache = TokenCache::new(16);
        assert_eq!(cache.capacity(), 16);
        let tok = |i: u64| {
            sign_ed(&sk, "a", json!({"iss": "https://idp.test/", "aud": "api://orders", "exp": T0 + 3600, "n": i}))
        };
        let hot = tok(0);
        let hot_arc = cache.verify(&[&v], &hot, at(T0)).unwrap();
        for i in 1..64 {
            cache.verify(&[&v], &tok(i), at(T0)).unwrap();
            assert!(cache.len() <= 16);
            assert!(Arc::ptr_eq(&hot_arc, &cache.verify(&[&v], &hot, at(T0)).unwrap()), "hot token evicted at {i}");
        }
        assert_eq!(cache.len(), 16);
        let big = TokenCache::new(10_000);
        assert!(big.capacity() >= 10_000 && big.capacity() < 10_016);
        assert!(TokenCache::new(0).capacity() >= 1);
    }

    #[test]
    fn concurrent_use_is_safe() {
        let sk = ed_key(1);
        let v = Arc::new(verifier(&ed_issuer(), &[jwk_key("a", &sk)]));
        let cache = Arc::new(TokenCache::new(48));
        let tokens: Arc<Vec<String>> = Arc::new(
            (0..64)
                .map(|i| {
                    sign_ed(
                        &sk,
                        "a",
                        json!({"iss": "https://idp.test/", "aud": "api://orders", "exp": T0 + 3600, "n": i}),
                    )
                })
                .collect(),
        );
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (v, cache, tokens) = (v.clone(), cache.clone(), tokens.clone());
                std::thread::spawn(move || {
                    for i in 0..100 {
                        let tok = &tokens[(i * 7 + t) % tokens.len()];
                        assert!(cache.verify(std::slice::from_ref(&v), tok, at(T0)).is_ok());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(cache.len() <= cache.capacity());
    }

    #[test]
    fn secret_key_sets() {
        let shared = issuer(KeySourceKind::SharedSecretFile("/s".into()), &[Algorithm::HS256, Algorithm::HS512]);
        assert!(KeySet::from_secret(&shared, &[7; 63]).unwrap_err().problem.contains("at least 64"));
        let set = KeySet::from_secret(&shared, &[7; 64]).unwrap();
        assert_eq!(set.len(), 1);
        let asym = issuer(KeySourceKind::Inline(String::new()), &[Algorithm::RS256]);
        assert!(KeySet::from_secret(&asym, &[7; 64]).is_err());
        // and a shared-secret issuer takes no JWKs
        let (set, errors) = KeySet::from_jwks(&shared, &[&jwk_key("a", &ed_key(1))], at(T0));
        assert!(set.is_empty());
        assert_eq!(errors.len(), 1);

        let v = Verifier::new(&shared, KeySet::from_secret(&shared, &[7; 64]).unwrap());
        let sign = |alg: &str, secret: &[u8]| {
            let h = B64_STRICT.encode(json!({"alg": alg, "kid": "../../dev/null"}).to_string());
            let p = B64_STRICT.encode(claims(T0 + 60).to_string());
            let mac = match alg {
                "HS256" => Hmac::<Sha256>::new_from_slice(secret)
                    .unwrap()
                    .chain_update(format!("{h}.{p}"))
                    .finalize()
                    .into_bytes()
                    .to_vec(),
                _ => Hmac::<Sha512>::new_from_slice(secret)
                    .unwrap()
                    .chain_update(format!("{h}.{p}"))
                    .finalize()
                    .into_bytes()
                    .to_vec(),
            };
            format!("{h}.{p}.{}", B64_STRICT.encode(mac))
        };
        let ok = v.verify(&sign("HS256", &[7; 64]), at(T0)).unwrap();
        assert_eq!((ok.kid.as_str(), ok.alg), ("", Algorithm::HS256));
        assert!(v.verify(&sign("HS512", &[7; 64]), at(T0)).is_ok());
        assert_eq!(v.verify(&sign("HS256", b""), at(T0)).unwrap_err(), JwtError::SignatureInvalid);
        assert!(!format!("{:?}", v.keys()).contains("7, 7"), "the secret is not printed");
    }

    #[test]
    fn key_set_refuses_bad_jwks() {
        let iss = issuer(KeySourceKind::Inline(String::new()), &[Algorithm::EdDSA, Algorithm::ES256]);
        let good = jwk_key("a", &ed_key(1));
        let with = |jwk: Value| Key { jwk, ..good.clone() };
        let x = good.jwk["x"].clone();
        let cases = [
            (with(json!({"kty": "OKP", "crv": "Ed448", "x": x})), "not supported"),
            (with(json!({"kty": "OKP", "crv": "Ed25519", "x": "AAAA"})), "32 bytes"),
            (with(json!({"kty": "OKP", "crv": "Ed25519", "x": x, "alg": "ES256"})), "does not fit"),
            (with(json!({"kty": "OKP", "crv": "Ed25519", "x": x, "use": "enc"})), "use"),
            (with(json!({"kty": "OKP", "crv": "Ed25519", "x": x, "key_ops": ["encrypt"]})), "key_ops"),
            (with(json!({"kty": "OKP", "crv": "Ed25519", "x": x, "d": "AAAA"})), "private"),
            (with(json!({"kty": "oct", "k": "AAAA"})), "symmetric"),
            (with(json!({"kty": "EC", "crv": "P-256", "x": x, "y": x})), "not on P-256"),
            (with(json!({"kty": "EC", "crv": "P-521", "x": x, "y": x})), "not supported"),
            (with(json!({"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"})), "48 bytes"),
            // a small-order point (the identity)
            (
                with(
                    json!({"kty": "OKP", "crv": "Ed25519", "x": B64_STRICT.encode([1u8; 1].iter().chain([0u8; 31].iter()).copied().collect::<Vec<_>>())}),
                ),
                "small order",
            ),
            (Key { issuer: "other".into(), ..good.clone() }, "belongs to issuer"),
        ];
        for (key, want) in cases {
            let (set, errors) = KeySet::from_jwks(&iss, &[&key], at(T0));
            assert!(set.is_empty(), "{key:?}");
            assert_eq!(errors.len(), 1, "{key:?}");
            assert!(errors[0].problem.contains(want), "{key:?}: {}", errors[0].problem);
        }
        // an EdDSA key for an issuer that allows only ES256
        let es_only = issuer(KeySourceKind::Inline(String::new()), &[Algorithm::ES256]);
        let (_, errors) = KeySet::from_jwks(&es_only, &[&good], at(T0));
        assert!(errors[0].problem.contains("does not allow"));
        // duplicate kid: the first stays
        let (set, errors) = KeySet::from_jwks(&iss, &[&good, &jwk_key("a", &ed_key(2))], at(T0));
        assert_eq!((set.len(), errors.len()), (1, 1));
        // retired keys are left out silently
        let retired = Key { retire_at: Some(at(T0)), ..good.clone() };
        let (set, errors) = KeySet::from_jwks(&iss, &[&retired], at(T0));
        assert!(set.is_empty() && errors.is_empty());
        let retiring = Key { retire_at: Some(at(T0 + 1)), ..good };
        assert_eq!(KeySet::from_jwks(&iss, &[&retiring], at(T0)).0.len(), 1);
    }

    #[test]
    fn missing_kid_only_with_a_single_key() {
        let (a, b) = (ed_key(1), ed_key(2));
        let no_kid = |sk: &ed25519_dalek::SigningKey| {
            let h = B64_STRICT.encode(r#"{"alg":"EdDSA"}"#);
            let p = B64_STRICT.encode(claims(T0 + 60).to_string());
            let sig = sk.sign(format!("{h}.{p}").as_bytes()).to_bytes();
            format!("{h}.{p}.{}", B64_STRICT.encode(sig))
        };
        let one = verifier(&ed_issuer(), &[jwk_key("a", &a)]);
        assert_eq!(one.verify(&no_kid(&a), at(T0)).unwrap().kid, "a");
        let two = verifier(&ed_issuer(), &[jwk_key("a", &a), jwk_key("b", &b)]);
        assert_eq!(two.verify(&no_kid(&a), at(T0)).unwrap_err(), JwtError::KidUnknown { kid: None });
    }

    #[test]
    fn claims_read_into_verified_token() {
        let sk = ed_key(1);
        let v = verifier(&ed_issuer(), &[jwk_key("a", &sk)]);
        let check = |c: Value| v.verify(&sign_ed(&sk, "a", c), at(T0));
        let base = |extra: Value| {
            let mut c = claims(T0 + 60);
            c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            c
        };
        let t =
            check(base(json!({"scope": "read  write", "client_id": "gw", "jti": "j1", "exp": (T0 + 60) as f64 + 0.5})))
                .unwrap();
        assert_eq!(t.scopes, ["read", "write"]);
        assert_eq!(
            (t.sub.as_deref(), t.client_id.as_deref(), t.jti.as_deref()),
            (Some("alice"), Some("gw"), Some("j1"))
        );
        assert_eq!((t.exp, t.iat, t.issuer.as_str(), t.kid.as_str()), (T0 + 60, Some(T0), "idp", "a"));
        assert_eq!(check(base(json!({"scp": ["a", "b"], "azp": "spa"}))).unwrap().scopes, ["a", "b"]);
        assert_eq!(check(base(json!({"azp": "spa"}))).unwrap().client_id.as_deref(), Some("spa"));
        assert_eq!(check(base(json!({"scp": "a b"}))).unwrap().scopes, ["a", "b"]);
        for (bad, claim) in [
            (json!({"scope": ["a"]}), "scope"),
            (json!({"scp": [1]}), "scp"),
            (json!({"sub": 5}), "sub"),
            (json!({"client_id": null}), "client_id"),
            (json!({"jti": {}}), "jti"),
            (json!({"nbf": "1"}), "nbf"),
            (json!({"iat": true}), "iat"),
            (json!({"iss": ["https://idp.test/"]}), "iss"),
            (json!({"aud": 1}), "aud"),
            (json!({"aud": ["api://orders", 1]}), "aud"),
        ] {
            assert_eq!(check(base(bad.clone())).unwrap_err(), JwtError::ClaimInvalid(claim), "{bad}");
        }
    }

    #[test]
    fn get_and_insert() {
        let sk = ed_key(1);
        let v = verifier(&ed_issuer(), &[jwk_key("a", &sk)]);
        let cache = TokenCache::new(8);
        let token = sign_ed(&sk, "a", claims(T0 + 100));
        let verified = Arc::new(v.verify(&token, at(T0)).unwrap());
        cache.insert(&v, &token, verified.clone(), at(T0 + 100));
        assert!(cache.is_empty(), "past exp: not stored");
        cache.insert(&v, &token, verified.clone(), at(T0));
        assert!(Arc::ptr_eq(&cache.get(&v, &token, at(T0 + 1)).unwrap().unwrap(), &verified));
        assert!(cache.get(&v, "other", at(T0 + 1)).is_none());
    }

    fn arbitrary_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            (T0 - 100..T0 + 100).prop_map(Value::from),
            prop::sample::select(vec!["https://idp.test/", "api://orders", "a b", "", "none"]).prop_map(Value::from),
            ".{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(vec![
                        "iss",
                        "aud",
                        "exp",
                        "nbf",
                        "iat",
                        "sub",
                        "scope",
                        "scp",
                        "client_id",
                        "azp",
                        "jti",
                        "x"
                    ]),
                    inner,
                    0..8
                )
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn verify_never_panics_on_text(token in "[A-Za-z0-9_.=+/ -]{0,120}") {
            let v = verifier(&ed_issuer(), &[jwk_key("a", &ed_key(1))]);
            let _ = v.verify(&token, at(T0));
        }

        /// Properly signed tokens with arbitrary headers and claims: every outcome is an answer.
        #[test]
        fn verify_never_panics_on_signed(
            alg in proptest::sample::select(vec!["EdDSA", "none", "HS256", "ES256", ""]),
            kid in proptest::option::of(proptest::sample::select(vec!["a", "b", ""])),
            extra in arbitrary_json(),
            claims in arbitrary_json(),
        ) {
            let sk = ed_key(1);
            let v = verifier(&ed_issuer(), &[jwk_key("a", &sk)]);
            let mut header = json!({"alg": alg, "kid": kid, "x": extra});
            if kid.is_none() {
                header.as_object_mut().unwrap().remove("kid");
            }
            let h = B64_STRICT.encode(header.to_string());
            let p = B64_STRICT.encode(claims.to_string());
            let sig = sk.sign(format!("{h}.{p}").as_bytes()).to_bytes();
            let token = format!("{h}.{p}.{}", B64_STRICT.encode(sig));
            if let Ok(t) = v.verify(&token, at(T0)) {
                proptest::prop_assert!(t.exp + 60 > T0);
                proptest::prop_assert_eq!(t.claims.get("iss").and_then(Value::as_str), Some("https://idp.test/"));
            }
        }
    }

    #[test]
    fn numeric_dates() {
        for (v, want) in [
            (json!(0), Some(0)),
            (json!(1_700_000_000), Some(1_700_000_000)),
            (json!(1.9), Some(1)),
            (json!(MAX_NUMERIC_DATE), Some(MAX_NUMERIC_DATE)),
            (json!(MAX_NUMERIC_DATE + 1), None),
            (json!(-1), None),
            (json!(-0.5), None),
            (json!(1e300), None),
            (json!(18446744073709551615u64), None),
            (json!("1"), None),
            (json!(null), None),
            (json!(true), None),
        ] {
            assert_eq!(numeric_date(&v), want, "{v}");
        }
    }

    #[test]
    fn strict_json() {
        let obj = |s: &str| decode_object(&B64_STRICT.encode(s));
        assert!(obj(r#"{"a":1,"b":{"c":[1,{"d":2}]}}"#).is_some());
        assert!(obj(r#"{"a":1,"a":2}"#).is_none());
        assert!(obj(r#"{"a":{"b":1,"b":1}}"#).is_none());
        assert!(obj(r#"{"a":[{"b":1,"b":1}]}"#).is_none());
        assert!(obj(r#"[1]"#).is_none());
        assert!(obj(r#"{"a":1} x"#).is_none());
        assert!(obj("\u{feff}{}").is_none());
        assert!(decode_object(&B64_STRICT.encode(b"{\"a\":\"\xff\"}")).is_none());
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(obj(&format!(r#"{{"a":{deep}}}"#)).is_none(), "recursion limit, no stack overflow");
    }

    #[test]
    fn bearer() {
        for (h, want) in [
            (None, Err("token_missing")),
            (Some("Basic dXNlcjpwYXNz"), Err("token_missing")),
            (Some("Bearer"), Err("token_malformed")),
            (Some("Bearer "), Err("token_malformed")),
            (Some("Bearer    "), Err("token_malformed")),
            (Some("Bearer a.b.c"), Ok("a.b.c")),
            (Some("bearer  a.b.c "), Ok("a.b.c")),
            (Some("BEARER a.b.c"), Ok("a.b.c")),
            (Some("Bearerx a.b.c"), Err("token_missing")),
        ] {
            assert_eq!(bearer_token(h).map_err(|e| e.reason()), want, "{h:?}");
        }
    }

    #[test]
    fn errors_are_generic_for_clients() {
        let all = [
            JwtError::Missing,
            JwtError::Malformed("x"),
            JwtError::KidUnknown { kid: Some("secret-kid".into()) },
            JwtError::SignatureInvalid,
            JwtError::Expired,
            JwtError::ClaimInvalid("exp"),
        ];
        for e in all {
            assert!(!e.description().contains("kid") && !e.to_string().contains("secret-kid"), "{e}");
            assert_eq!(e.to_string(), e.to_string().to_lowercase(), "{e}");
        }
    }
}
