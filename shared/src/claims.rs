//! The claims policy engine: decides whether a verified token satisfies a Policy's required
//! scopes and claim rules. The proxy runs it after authentication; the upstream-side claims-check
//! library runs the very same code, so both sides read a rule the same way.
//!
//! What it must not do: look at an unverified token (it takes a [`VerifiedToken`] only), panic on
//! any claim shape, coerce types beyond the documented rules below, or put a claim *value* into a
//! denial (values can be personal data; denials name the configured scope or claim path only).
//!
//! Semantics, decided once:
//! - **Path**: a rule's dotted path walks nested objects. At each level the longest run of
//!   segments that is a member name wins, so a namespaced claim such as
//!   `https://example.com/roles` is reachable as written; there is no backtracking and no array
//!   indexing. A `null` value counts as absent.
//! - **Scalars** compare by text: a string as itself, `true`/`false`, a number as serde_json
//!   prints it (`42`, `1.5`; `1.0` stays `1.0`). Arrays and objects are never scalars.
//! - **equals**: the claim is a scalar whose text equals the value (an array never equals).
//! - **in**: the claim is a scalar in the list, or an array with at least one scalar element in
//!   the list.
//! - **contains**: the claim is an array with a scalar element equal to the value, or a string in
//!   which the value is one of the space-separated words (as in `scope`): never a substring.
//! - **exists**: `true` needs the claim present, `false` needs it absent.
//! - **regex**: the claim is a string and the (anchored, see `model::claim_rule`) regex matches
//!   all of it; numbers and other types do not match.
//! - **scopes**: every required scope must be among the token's scopes (`scope`/`scp`).
//!
//! A missing claim gives [`ClaimDenial::ClaimMissing`]; a present one that fails the rule,
//! [`ClaimDenial::ClaimMismatch`].

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::jwt::VerifiedToken;
use crate::model::{ClaimOp, ClaimRule, Policy};

/// Why a verified token does not satisfy a policy (→ 403).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimDenial {
    #[error("required scope {scope:?} is missing")]
    ScopeMissing { scope: String },
    #[error("claim {claim:?} is missing")]
    ClaimMissing { claim: String },
    #[error("claim {claim:?} does not satisfy its rule")]
    ClaimMismatch { claim: String },
}

impl ClaimDenial {
    /// Stable snake_case name, the same in metrics, audit events and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ClaimDenial::ScopeMissing { .. } => "scope_missing",
            ClaimDenial::ClaimMissing { .. } => "claim_missing",
            ClaimDenial::ClaimMismatch { .. } => "claim_mismatch",
        }
    }
}

/// Checks `policy`'s required scopes, then its claim rules in order; the first failure is the
/// answer.
pub fn authorize(policy: &Policy, token: &VerifiedToken) -> Result<(), ClaimDenial> {
    if let Some(scope) = policy.required_scopes.iter().find(|s| !token.scopes.contains(s)) {
        return Err(ClaimDenial::ScopeMissing { scope: scope.clone() });
    }
    policy.claims.iter().try_for_each(|rule| check_rule(rule, &token.claims))
}

/// Checks one claim rule against a claims object.
pub fn check_rule(rule: &ClaimRule, claims: &Map<String, Value>) -> Result<(), ClaimDenial> {
    let value = lookup(claims, &rule.claim);
    let missing = || ClaimDenial::ClaimMissing { claim: rule.claim.join(".") };
    let mismatch = || ClaimDenial::ClaimMismatch { claim: rule.claim.join(".") };
    let ok = match (&rule.op, value) {
        (ClaimOp::Exists(want), v) => {
            return match (want, v) {
                (true, Some(_)) | (false, None) => Ok(()),
                (true, None) => Err(missing()),
                (false, Some(_)) => Err(mismatch()),
            };
        }
        (_, None) => return Err(missing()),
        (ClaimOp::Equals(want), Some(v)) => scalar(v).is_some_and(|t| t == want.as_str()),
        (ClaimOp::In(list), Some(Value::Array(items))) => {
            items.iter().filter_map(scalar).any(|t| list.iter().any(|w| w.as_str() == t))
        }
        (ClaimOp::In(list), Some(v)) => scalar(v).is_some_and(|t| list.iter().any(|w| w.as_str() == t)),
        (ClaimOp::Contains(want), Some(Value::Array(items))) => {
            items.iter().filter_map(scalar).any(|t| t == want.as_str())
        }
        (ClaimOp::Contains(want), Some(Value::String(s))) => s.split(' ').any(|w| w == want),
        (ClaimOp::Contains(_), Some(_)) => false,
        (ClaimOp::Regex(re), Some(Value::String(s))) => re.is_match(s),
        (ClaimOp::Regex(_), Some(_)) => false,
    };
    if ok { Ok(()) } else { Err(mismatch()) }
}

/// The value at a dotted `path` (see the module docs), `None` if absent or `null`.
pub fn lookup<'a>(claims: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let mut obj = claims;
    let mut rest = path;
    loop {
        let (value, used) = longest_member(obj, rest)?;
        rest = &rest[used..];
        if rest.is_empty() {
            return (!value.is_null()).then_some(value);
        }
        obj = value.as_object()?;
    }
}

/// The member named by the longest prefix of `segments` joined with dots, and that prefix's length.
fn longest_member<'a>(obj: &'a Map<String, Value>, segments: &[String]) -> Option<(&'a Value, usize)> {
    for n in (1..=segments.len()).rev() {
        let hit = if n == 1 { obj.get(&segments[0]) } else { obj.get(&segments[..n].join(".")) };
        if let Some(v) = hit {
            return Some((v, n));
        }
    }
    None
}

fn scalar(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Algorithm, Authentication, PolicyMode};
    use proptest::prelude::*;
    use serde_json::json;

    fn token(claims: Value, scopes: &[&str]) -> VerifiedToken {
        VerifiedToken {
            claims: claims.as_object().cloned().unwrap_or_default(),
            sub: None,
            client_id: None,
            jti: None,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            exp: 0,
            iat: None,
            kid: String::new(),
            alg: Algorithm::ES256,
            issuer: "idp".into(),
        }
    }

    fn policy(scopes: &[&str], claims: Vec<ClaimRule>) -> Policy {
        Policy {
            name: "p".into(),
            authentication: Authentication::Public { reason: "test".into() },
            required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
            claims,
            rate_limits: vec![],
            allow: vec![],
            deny: vec![],
            forward_token: false,
            claim_headers: Default::default(),
            mode: PolicyMode::Enforce,
        }
    }

    fn rule(path: &str, op: ClaimOp) -> ClaimRule {
        ClaimRule { claim: path.split('.').map(str::to_owned).collect(), op }
    }

    fn regex(re: &str) -> ClaimOp {
        // as model::claim_rule compiles it: anchored
        ClaimOp::Regex(regex::Regex::new(&format!("^(?:{re})$")).unwrap())
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Evaluates `op` on the claim at `path` of `claims` and compares the reason (`""` = allowed).
    #[track_caller]
    fn check(claims: &Value, path: &str, op: ClaimOp, want: &str) {
        let got = check_rule(&rule(path, op.clone()), claims.as_object().unwrap());
        let got = got.err().map_or("", |d| d.reason());
        assert_eq!(got, want, "{path} {op:?} on {claims}");
    }

    #[test]
    fn rules_table() {
        let c = json!({
            "sub": "alice", "n": 42, "f": 1.5, "t": true, "nul": null,
            "roles": ["admin", "dev", 7], "scope": "read write", "tenant": {"id": "t1", "tier": {"name": "gold"}},
            "https://example.com/roles": ["ops"], "a": {"b.c": "dotted"}, "empty": [], "obj": {"x": 1},
        });
        use ClaimOp::*;
        let cases: Vec<(&str, ClaimOp, &str)> = vec![
            ("sub", Equals("alice".into()), ""),
            ("sub", Equals("Alice".into()), "claim_mismatch"),
            ("sub", Equals("alic".into()), "claim_mismatch"),
            ("n", Equals("42".into()), ""),
            ("n", Equals("42.0".into()), "claim_mismatch"),
            ("f", Equals("1.5".into()), ""),
            ("t", Equals("true".into()), ""),
            ("roles", Equals("admin".into()), "claim_mismatch"),
            ("obj", Equals("{}".into()), "claim_mismatch"),
            ("missing", Equals("x".into()), "claim_missing"),
            ("nul", Equals("null".into()), "claim_missing"),
            ("tenant.id", Equals("t1".into()), ""),
            ("tenant.tier.name", Equals("gold".into()), ""),
            ("tenant.nope", Equals("t1".into()), "claim_missing"),
            ("sub.deeper", Equals("x".into()), "claim_missing"),
            ("a.b.c", Equals("dotted".into()), ""),
            ("sub", In(strings(&["bob", "alice"])), ""),
            ("sub", In(strings(&["bob"])), "claim_mismatch"),
            ("n", In(strings(&["41", "42"])), ""),
            ("roles", In(strings(&["dev", "x"])), ""),
            ("roles", In(strings(&["7"])), ""),
            ("roles", In(strings(&["root"])), "claim_mismatch"),
            ("empty", In(strings(&["x"])), "claim_mismatch"),
            ("obj", In(strings(&["x"])), "claim_mismatch"),
            ("roles", Contains("admin".into()), ""),
            ("roles", Contains("adm".into()), "claim_mismatch"),
            ("scope", Contains("write".into()), ""),
            ("scope", Contains("writ".into()), "claim_mismatch"),
            ("scope", Contains("read write".into()), "claim_mismatch"),
            ("n", Contains("4".into()), "claim_mismatch"),
            ("https://example.com/roles", Contains("ops".into()), ""),
            ("nothing", Contains("ops".into()), "claim_missing"),
            ("sub", Exists(true), ""),
            ("sub", Exists(false), "claim_mismatch"),
            ("missing", Exists(true), "claim_missing"),
            ("missing", Exists(false), ""),
            ("nul", Exists(false), ""),
            ("nul", Exists(true), "claim_missing"),
            ("sub", regex("al.*"), ""),
            ("sub", regex("lic"), "claim_mismatch"),
            ("sub", regex("a|alice"), ""),
            ("n", regex("4.*"), "claim_mismatch"),
            ("roles", regex(".*"), "claim_mismatch"),
            ("missing", regex(".*"), "claim_missing"),
        ];
        for (path, op, want) in cases {
            check(&c, path, op, want);
        }
    }

    #[test]
    fn scopes_then_rules() {
        let t = token(json!({"sub": "alice", "tenant": "t1"}), &["read", "write"]);
        let p = policy(&["read"], vec![rule("tenant", ClaimOp::Equals("t1".into()))]);
        assert_eq!(authorize(&p, &t), Ok(()));
        let p = policy(&["read", "admin"], vec![]);
        let d = authorize(&p, &t).unwrap_err();
        assert_eq!((d.reason(), d), ("scope_missing", ClaimDenial::ScopeMissing { scope: "admin".into() }));
        let p =
            policy(&[], vec![rule("tenant", ClaimOp::Equals("t1".into())), rule("sub", ClaimOp::Equals("bob".into()))]);
        let d = authorize(&p, &t).unwrap_err();
        assert_eq!(d, ClaimDenial::ClaimMismatch { claim: "sub".into() });
        // the denial names the rule, never the value
        assert!(!d.to_string().contains("alice"));
        assert_eq!(authorize(&policy(&[], vec![]), &t), Ok(()));
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a-c .]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map("[a-c.]{1,3}", inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn claim_op() -> impl Strategy<Value = ClaimOp> {
        prop_oneof![
            "[a-c 0-9.]{0,4}".prop_map(ClaimOp::Equals),
            prop::collection::vec("[a-c0-9]{0,3}", 0..4).prop_map(ClaimOp::In),
            "[a-c ]{0,3}".prop_map(ClaimOp::Contains),
            any::<bool>().prop_map(ClaimOp::Exists),
            prop::sample::select(vec!["a.*", "", "[0-9]+", "(a|b)c?"]).prop_map(regex),
        ]
    }

    proptest! {
        #[test]
        fn rules_never_panic(claims in json_value(), path in prop::collection::vec("[a-c.]{1,3}", 1..4), op in claim_op()) {
            let claims = match claims { Value::Object(m) => m, other => Map::from_iter([("a".to_string(), other)]) };
            let r = ClaimRule { claim: path, op };
            let _ = check_rule(&r, &claims);
        }
    }
}
