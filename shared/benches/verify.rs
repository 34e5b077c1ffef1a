//! Benchmarks of token verification, per core: a cold `Verifier::verify` (parse, claim checks,
//! signature) for ES256, RS256 (2048-bit) and EdDSA, the same tokens through a warm `TokenCache`
//! (SHA-256 of the token and a shard lookup), a cached bad signature, a cheap refusal, and the
//! claims policy check that runs on every request. Tokens carry realistic claims (~700-900 bytes).
//!
//! It prints figures; it asserts nothing (that is what the tests are for). Target: a cached hit
//! ≤ 1 µs.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::EncodingKey;
use portcullis_shared::claims::authorize;
use portcullis_shared::jwt::{KeySet, TokenCache, Verifier};
use portcullis_shared::model::{
    Algorithm, Authentication, ClaimOp, ClaimRule, Issuer, Key, KeySource, KeySourceKind, Policy, PolicyMode,
};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};

const T0: u64 = 1_700_000_000;

fn ok<T, E: std::fmt::Debug>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e:?}"),
    }
}

fn der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    ok(STANDARD.decode(body), "pem")
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

struct Fixture {
    verifier: Verifier,
    rs256: String,
    es256: String,
    eddsa: String,
    forged: String,
    expired: String,
}

fn claims(exp: u64) -> Value {
    json!({
        "iss": "https://idp.example.com/", "aud": ["api://orders", "api://billing"], "sub": "248289761001",
        "client_id": "orders-web", "jti": "b7d2c0a6-6f0c-4c59-9e0d-3c1b3a8f9b21", "iat": T0 - 30, "nbf": T0 - 30,
        "exp": exp, "scope": "orders:read orders:write profile email",
        "tenant": {"id": "t-42", "tier": "gold"}, "roles": ["buyer", "approver"], "auth_time": T0 - 300,
    })
}

fn fixture() -> Fixture {
    let rsa =
        ok(rsa::RsaPrivateKey::from_pkcs8_der(&der(include_str!("../tests/keys/test_issuer_rsa2048.pem"))), "rsa");
    let rsa_sign = EncodingKey::from_rsa_der(ok(rsa.to_pkcs1_der(), "pkcs1").as_bytes());
    let p256_der = der(include_str!("../tests/keys/test_issuer_p256.pem"));
    let p256 = ok(p256::SecretKey::from_pkcs8_der(&p256_der), "p256");
    let point = p256.public_key().to_sec1_bytes();
    let ed_der = der(include_str!("../tests/keys/test_issuer_ed25519.pem"));
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&ed_der[ed_der.len() - 32..]);
    let ed_pub = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes();
    let evil =
        ok(rsa::RsaPrivateKey::from_pkcs8_der(&der(include_str!("../tests/keys/test_attacker_rsa2048.pem"))), "rsa");
    let evil_sign = EncodingKey::from_rsa_der(ok(evil.to_pkcs1_der(), "pkcs1").as_bytes());

    let issuer = Issuer {
        name: "corp-idp".into(),
        issuer: "https://idp.example.com/".into(),
        audiences: vec!["api://orders".into()],
        algorithms: vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
        clock_skew: Duration::from_secs(60),
        max_token_age: None,
        keys: KeySource {
            kind: KeySourceKind::JwksUri("https://idp.example.com/jwks".into()),
            refresh_interval: Duration::from_secs(300),
        },
        introspection: None,
        require_at_jwt: false,
    };
    let key = |kid: &str, jwk: Value| Key {
        name: kid.into(),
        issuer: "corp-idp".into(),
        kid: kid.into(),
        jwk,
        retire_at: None,
    };
    let keys = [
        key(
            "rsa-1",
            json!({"kty": "RSA", "alg": "RS256", "n": b64(rsa.n().to_bytes_be()), "e": b64(rsa.e().to_bytes_be())}),
        ),
        key("ec-1", json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..])})),
        key("ed-1", json!({"kty": "OKP", "crv": "Ed25519", "x": b64(ed_pub)})),
    ];
    let refs: Vec<&Key> = keys.iter().collect();
    let (set, errors) = KeySet::from_jwks(&issuer, &refs, SystemTime::UNIX_EPOCH + Duration::from_secs(T0));
    assert!(errors.is_empty(), "{errors:?}");
    let verifier = Verifier::new(&issuer, set);

    let sign = |alg: &str, kid: &str, claims: &Value, key: &EncodingKey| {
        let input = format!(
            "{}.{}",
            b64(json!({"alg": alg, "kid": kid, "typ": "at+jwt"}).to_string()),
            b64(claims.to_string())
        );
        let sig = ok(jsonwebtoken::crypto::sign(input.as_bytes(), key, ok(alg.parse(), "alg")), "sign");
        format!("{input}.{sig}")
    };
    let c = claims(T0 + 3600);
    Fixture {
        rs256: sign("RS256", "rsa-1", &c, &rsa_sign),
        es256: sign("ES256", "ec-1", &c, &EncodingKey::from_ec_der(&p256_der)),
        eddsa: sign("EdDSA", "ed-1", &c, &EncodingKey::from_ed_der(&ed_der)),
        forged: sign("RS256", "rsa-1", &c, &evil_sign),
        expired: sign("RS256", "rsa-1", &claims(T0 - 3600), &rsa_sign),
        verifier,
    }
}

fn bench_verify(c: &mut Criterion) {
    let f = fixture();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(T0);
    let v = &f.verifier;
    eprintln!("token sizes: RS256 {} B, ES256 {} B, EdDSA {} B", f.rs256.len(), f.es256.len(), f.eddsa.len());
    for (name, token) in [("ES256", &f.es256), ("RS256", &f.rs256), ("EdDSA", &f.eddsa)] {
        assert!(v.verify(token, now).is_ok(), "{name} token must verify");
        c.bench_function(&format!("verify/cold/{name}"), |b| b.iter(|| black_box(v.verify(black_box(token), now))));
    }
    c.bench_function("verify/cold/RS256 bad signature", |b| b.iter(|| black_box(v.verify(black_box(&f.forged), now))));
    c.bench_function("verify/cold/expired (refused before the signature)", |b| {
        b.iter(|| black_box(v.verify(black_box(&f.expired), now)))
    });

    // the floor of a cached hit: the cache key is the token's SHA-256
    c.bench_function("sha256 of the RS256 token", |b| {
        b.iter(|| black_box(<sha2::Sha256 as sha2::Digest>::digest(black_box(f.rs256.as_bytes()))))
    });

    let cache = TokenCache::new(100_000);
    let verifiers = [v];
    for (name, token) in [("ES256", &f.es256), ("RS256", &f.rs256), ("EdDSA", &f.eddsa)] {
        assert!(cache.verify(&verifiers, token, now).is_ok());
        c.bench_function(&format!("verify/cached/{name}"), |b| {
            b.iter(|| black_box(cache.verify(&verifiers, black_box(token), now)))
        });
    }
    assert!(cache.verify(&verifiers, &f.forged, now).is_err());
    c.bench_function("verify/cached/RS256 bad signature", |b| {
        b.iter(|| black_box(cache.verify(&verifiers, black_box(&f.forged), now)))
    });

    let token = ok(cache.verify(&verifiers, &f.rs256, now), "cached");
    let policy = Policy {
        name: "orders-write".into(),
        authentication: Authentication::Public { reason: "bench".into() },
        required_scopes: vec!["orders:read".into(), "orders:write".into()],
        claims: vec![
            ClaimRule {
                claim: vec!["tenant".into(), "tier".into()],
                op: ClaimOp::In(vec!["silver".into(), "gold".into()]),
            },
            ClaimRule { claim: vec!["roles".into()], op: ClaimOp::Contains("approver".into()) },
            ClaimRule {
                claim: vec!["client_id".into()],
                op: ClaimOp::Regex(ok(regex::Regex::new("^(?:orders-[a-z]+)$"), "regex")),
            },
        ],
        rate_limits: vec![],
        allow: vec![],
        deny: vec![],
        forward_token: true,
        claim_headers: Default::default(),
        mode: PolicyMode::Enforce,
    };
    assert!(authorize(&policy, &token).is_ok());
    c.bench_function("claims/authorize (2 scopes, 3 rules)", |b| {
        b.iter(|| black_box(authorize(&policy, black_box(&token))))
    });
}

criterion_group!(benches, bench_verify);
criterion_main!(benches);
