//! The operators' YAML document format (`kind`, `name`, `spec`; several documents per file) and
//! its exact mapping to and from [`pb::Resource`]. `portctl` reads files with [`parse_documents`]
//! and writes them with [`to_yaml`]; the control plane diffs resources through [`spec_json`].
//!
//! This module only checks the *shape* of a document: unknown fields, wrong types, durations,
//! timestamps, enum names, and at most one member of each `oneof`. Whether the values make sense
//! (names, references, key sizes, paths) is for the server's validation in [`crate::model`] and
//! [`crate::config`], and must not be duplicated here. The mapping is a bijection on what the
//! server stores: `parse_documents(to_yaml(x)) == x` (revisions aside), so `portctl export |
//! portctl apply -f -` changes nothing.

use std::collections::BTreeMap;
use std::fmt;

use portcullis_proto::config::v1 as pb;
use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Kind;
use crate::duration;

// ---------------------------------------------------------------- public API

/// A problem with one document of one file, located well enough to find and fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocumentError {
    /// File path, or `-` for standard input.
    pub source: String,
    /// 1-based number of the document in that file (empty documents count).
    pub index: usize,
    /// The document's kind as written in documents (`Route`), when it could be read.
    pub kind: Option<String>,
    pub name: Option<String>,
    /// Dotted path within the document (`spec.match.path`); empty for the whole document.
    pub field: String,
    pub message: String,
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.source, self.index)?;
        match (&self.kind, &self.name) {
            (Some(k), Some(n)) => write!(f, " ({k} {n})")?,
            (Some(k), None) => write!(f, " ({k})")?,
            (None, Some(n)) => write!(f, " ({n})")?,
            (None, None) => {}
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for DocumentError {}

/// One resource read from a file, with the number of the document it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedDocument {
    /// 1-based document number in its file, as in [`DocumentError::index`].
    pub index: usize,
    pub resource: pb::Resource,
}

/// Reads every non-empty document of `text`; `source` names the file in errors. Returns every
/// error found (at most one per document; none past a YAML syntax error, which ends the stream).
pub fn parse_documents(text: &str, source: &str) -> Result<Vec<pb::Resource>, Vec<DocumentError>> {
    parse_located(text, source).map(|docs| docs.into_iter().map(|d| d.resource).collect())
}

/// Like [`parse_documents`], keeping each resource's document number, so that a later error
/// about a resource (from the server) can point back at the document it came from.
pub fn parse_located(text: &str, source: &str) -> Result<Vec<ParsedDocument>, Vec<DocumentError>> {
    // Pass 1: the documents as generic YAML, for syntax errors and each one's kind and name
    // (so that errors deeper in a document can name the resource).
    let mut heads: Vec<Option<Head>> = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => heads.push(None),
            Ok(value) => match head(&value) {
                Ok(h) => heads.push(Some(h)),
                Err((kind, name, field, message)) => {
                    errors.push(DocumentError { source: source.to_owned(), index, kind, name, field, message });
                    heads.push(None);
                }
            },
            Err(e) => {
                let message = e.to_string();
                errors.push(DocumentError {
                    source: source.to_owned(),
                    index,
                    kind: None,
                    name: None,
                    field: String::new(),
                    message: format!("invalid YAML: {message}"),
                });
                // A duplicate key is found after the document was read whole; after any other
                // error (syntax, unknown anchor) the parser may be stuck inside the document,
                // and serde_yaml repeats the error or even panics if asked for the next one.
                if !message.starts_with("duplicate entry with key") {
                    break;
                }
                heads.push(None);
            }
        }
    }

    // Pass 2: each document again, now typed by its kind; serde_yaml keeps line numbers.
    let mut out = Vec::new();
    for (i, (doc, head)) in serde_yaml::Deserializer::from_str(text).zip(heads).enumerate() {
        let Some(head) = head else { continue };
        let index = i + 1;
        let mut track = serde_path_to_error::Track::new();
        let seed = DocumentSeed { kind: head.kind };
        match seed.deserialize(serde_path_to_error::Deserializer::new(doc, &mut track)) {
            Ok(resource) => out.push(ParsedDocument { index, resource }),
            Err(e) => {
                let path = track.path();
                let field = if path.iter().next().is_none() { String::new() } else { path.to_string() };
                let message = strip_path(&field, &e.to_string()).to_owned();
                errors.push(DocumentError {
                    source: source.to_owned(),
                    index,
                    kind: Some(head.kind.document_name().to_owned()),
                    name: head.name,
                    field,
                    message,
                });
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        errors.sort_by_key(|e| e.index);
        Err(errors)
    }
}

/// serde_yaml starts its messages with its own idea of the path: the field, or (for unknown
/// fields and `oneof` errors) one of its parents. The field is reported on its own.
fn strip_path<'a>(field: &str, message: &'a str) -> &'a str {
    let mut path = field;
    while !path.is_empty() {
        if let Some(rest) = message.strip_prefix(path).and_then(|m| m.strip_prefix(": ")) {
            return rest;
        }
        path = &path[..path.rfind(['.', '[']).unwrap_or(0)];
    }
    message
}

/// Multi-document YAML, `---` between documents, in the order given. Revisions are left out.
pub fn to_yaml(resources: &[pb::Resource]) -> String {
    let mut out = String::new();
    for doc in resources.iter().filter_map(DocumentOut::from_resource) {
        if !out.is_empty() {
            out.push_str("---\n");
        }
        match serde_yaml::to_string(&doc) {
            Ok(text) => out.push_str(&text),
            // unreachable for these types (string keys only); say so rather than drop a resource
            Err(e) => out.push_str(&format!("# {} {}: cannot render: {e}\n", doc.kind, doc.name)),
        }
    }
    out
}

/// A pretty-printed JSON array of documents (same shape as the YAML), ending in a newline.
pub fn to_json(resources: &[pb::Resource]) -> String {
    let docs: Vec<DocumentOut<'_>> = resources.iter().filter_map(DocumentOut::from_resource).collect();
    let mut out = serde_json::to_string_pretty(&docs).unwrap_or_else(|e| format!("\"cannot render: {e}\""));
    out.push('\n');
    out
}

/// The `spec` of the resource's document as JSON (`null` for a resource with no kind set).
pub fn spec_json(resource: &pb::Resource) -> serde_json::Value {
    match resource.kind.as_ref() {
        Some(kind) => serde_json::to_value(Spec::from_proto(kind)).unwrap_or(serde_json::Value::Null),
        None => serde_json::Value::Null,
    }
}

// ---------------------------------------------------------------- documents

struct Head {
    kind: Kind,
    name: Option<String>,
}

type HeadError = (Option<String>, Option<String>, String, String);

/// Kind and name of a generic document, or why it is not a resource document.
fn head(value: &serde_yaml::Value) -> Result<Head, HeadError> {
    let Some(map) = value.as_mapping() else {
        return Err((None, None, String::new(), "a document must be a mapping with kind, name and spec".into()));
    };
    let name = map.get("name").and_then(|n| n.as_str()).map(str::to_owned);
    let expected = || Kind::ALL.map(Kind::document_name).join(", ");
    let written = map.get("kind").and_then(|k| k.as_str());
    let kind = match map.get("kind") {
        None => Err(format!("missing: expected one of {}", expected())),
        Some(serde_yaml::Value::String(s)) => Kind::ALL
            .into_iter()
            .find(|k| k.document_name() == s || k.as_str() == s)
            .ok_or_else(|| crate::kind::UnknownKind(s.clone()).to_string()),
        Some(_) => Err(format!("must be a string: one of {}", expected())),
    };
    let label = match &kind {
        Ok(k) => Some(k.document_name().to_owned()),
        Err(_) => written.map(str::to_owned),
    };
    let kind = kind.map_err(|message| (label.clone(), name.clone(), "kind".to_owned(), message))?;
    if !map.contains_key("name") {
        return Err((label, None, "name".into(), "missing: every document needs a name".into()));
    }
    Ok(Head { kind, name })
}

/// A document as written: the capitalised kind, then name, then spec.
#[derive(Serialize)]
struct DocumentOut<'a> {
    kind: &'static str,
    name: &'a str,
    spec: Spec,
}

impl<'a> DocumentOut<'a> {
    fn from_resource(r: &'a pb::Resource) -> Option<DocumentOut<'a>> {
        let (kind, name) = Kind::of(r)?;
        let spec = Spec::from_proto(r.kind.as_ref()?);
        Some(DocumentOut { kind: kind.document_name(), name, spec })
    }
}

/// Reads one document whose kind is already known (pass 1 checked it).
struct DocumentSeed {
    kind: Kind,
}

impl<'de> DeserializeSeed<'de> for DocumentSeed {
    type Value = pb::Resource;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<pb::Resource, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DocumentSeed {
    type Value = pb::Resource;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping with kind, name and spec")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<pb::Resource, A::Error> {
        const FIELDS: &[&str] = &["kind", "name", "spec"];
        let (mut kind, mut name, mut spec) = (false, None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "kind" if !kind => {
                    kind = true;
                    map.next_value::<de::IgnoredAny>()?;
                }
                "name" if name.is_none() => name = Some(map.next_value::<String>()?),
                "spec" if spec.is_none() => spec = Some(map.next_value_seed(SpecSeed { kind: self.kind })?),
                // raised while reading the value, so that the error's path ends in this key
                _ => {
                    return map.next_value_seed(Reject { key: &key, fields: FIELDS });
                }
            }
        }
        let name = name.ok_or_else(|| de::Error::missing_field("name"))?;
        let spec = spec.flatten().unwrap_or_else(|| Spec::empty(self.kind));
        Ok(spec.into_resource(name))
    }
}

/// Fails with "unknown field" or "duplicate field" for `key`.
struct Reject<'a> {
    key: &'a str,
    fields: &'static [&'static str],
}

impl<'de> DeserializeSeed<'de> for Reject<'_> {
    type Value = pb::Resource;

    fn deserialize<D: Deserializer<'de>>(self, _: D) -> Result<pb::Resource, D::Error> {
        if self.fields.contains(&self.key) {
            Err(de::Error::duplicate_field(self.fields.iter().find(|f| **f == self.key).copied().unwrap_or("")))
        } else {
            Err(de::Error::unknown_field(self.key, self.fields))
        }
    }
}

/// Reads a `spec` of a known kind; `null` (written `spec:`) is an empty spec.
struct SpecSeed {
    kind: Kind,
}

impl<'de> DeserializeSeed<'de> for SpecSeed {
    type Value = Option<Spec>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Spec>, D::Error> {
        Ok(match self.kind {
            Kind::Upstream => Option::<UpstreamSpec>::deserialize(d)?.map(Spec::Upstream),
            Kind::Issuer => Option::<IssuerSpec>::deserialize(d)?.map(Spec::Issuer),
            Kind::Key => Option::<KeySpec>::deserialize(d)?.map(Spec::Key),
            Kind::Policy => Option::<PolicySpec>::deserialize(d)?.map(Spec::Policy),
            Kind::Route => Option::<RouteSpec>::deserialize(d)?.map(Spec::Route),
            Kind::Block => Option::<Checked<BlockSpec>>::deserialize(d)?.map(|Checked(b)| Spec::Block(b)),
        })
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum Spec {
    Upstream(UpstreamSpec),
    Issuer(IssuerSpec),
    Key(KeySpec),
    Policy(PolicySpec),
    Route(RouteSpec),
    Block(BlockSpec),
}

impl Spec {
    fn empty(kind: Kind) -> Spec {
        match kind {
            Kind::Upstream => Spec::Upstream(UpstreamSpec::default()),
            Kind::Issuer => Spec::Issuer(IssuerSpec::default()),
            Kind::Key => Spec::Key(KeySpec::default()),
            Kind::Policy => Spec::Policy(PolicySpec::default()),
            Kind::Route => Spec::Route(RouteSpec::default()),
            Kind::Block => Spec::Block(BlockSpec::default()),
        }
    }

    fn into_resource(self, name: String) -> pb::Resource {
        use pb::resource::Kind as K;
        let kind = match self {
            Spec::Upstream(s) => K::Upstream(s.into_proto(name)),
            Spec::Issuer(s) => K::Issuer(s.into_proto(name)),
            Spec::Key(s) => K::Key(s.into_proto(name)),
            Spec::Policy(s) => K::Policy(s.into_proto(name)),
            Spec::Route(s) => K::Route(s.into_proto(name)),
            Spec::Block(s) => K::Block(s.into_proto(name)),
        };
        pb::Resource { kind: Some(kind) }
    }

    fn from_proto(kind: &pb::resource::Kind) -> Spec {
        use pb::resource::Kind as K;
        match kind {
            K::Upstream(r) => Spec::Upstream(UpstreamSpec::from_proto(r)),
            K::Issuer(r) => Spec::Issuer(IssuerSpec::from_proto(r)),
            K::Key(r) => Spec::Key(KeySpec::from_proto(r)),
            K::Policy(r) => Spec::Policy(PolicySpec::from_proto(r)),
            K::Route(r) => Spec::Route(RouteSpec::from_proto(r)),
            K::Block(r) => Spec::Block(BlockSpec::from_proto(r)),
        }
    }
}

// ---------------------------------------------------------------- value types

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A protobuf duration written as `250ms`, `5s`, `1m30s`. Sub-millisecond parts (which only the
/// API can produce) are written with `us`/`ns` units so that they survive a round trip.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Dur(prost_types::Duration);

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(&self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 250ms, 5s or 1m30s")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

fn opt_dur(d: Option<&prost_types::Duration>) -> Option<Dur> {
    d.copied().map(Dur)
}

fn parse_duration(text: &str) -> Result<prost_types::Duration, String> {
    match duration::parse(text) {
        Ok(d) => Ok(duration::to_proto(d)),
        Err(e) => parse_fine_duration(text.trim()).ok_or_else(|| e.to_string()),
    }
}

/// `duration::parse` plus `us` and `ns` units and an unbounded range (in nanoseconds).
fn parse_fine_duration(s: &str) -> Option<prost_types::Duration> {
    const UNITS: [(&str, u128); 7] = [
        ("d", 86_400_000_000_000),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
        ("ns", 1),
    ];
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let unit_len = rest[digits..].bytes().take_while(u8::is_ascii_alphabetic).count();
        let value: u128 = rest[..digits].parse().ok()?;
        let unit = &rest[digits..digits + unit_len];
        let size = UNITS.iter().find(|(u, _)| *u == unit)?.1;
        total = total.checked_add(value.checked_mul(size)?)?;
        rest = &rest[digits + unit_len..];
    }
    Some(prost_types::Duration {
        seconds: i64::try_from(total / 1_000_000_000).ok()?,
        nanos: i32::try_from(total % 1_000_000_000).ok()?,
    })
}

fn format_duration(d: &prost_types::Duration) -> String {
    let Some(std) = duration::from_proto(d) else {
        // negative or malformed: only the API can store one, and validation refuses it
        return format!("{}s{}ns", d.seconds, d.nanos);
    };
    let sub_ms = std.subsec_nanos() % 1_000_000;
    let whole_ms = std - std::time::Duration::from_nanos(u64::from(sub_ms));
    let mut out = if whole_ms.is_zero() && sub_ms > 0 { String::new() } else { duration::format(whole_ms) };
    if sub_ms % 1_000 == 0 && sub_ms > 0 {
        out.push_str(&format!("{}us", sub_ms / 1_000));
    } else if sub_ms > 0 {
        out.push_str(&format!("{sub_ms}ns"));
    }
    out
}

/// A protobuf timestamp written in RFC 3339 (`2026-12-01T00:00:00Z`, `…T10:00:00.5+02:00`);
/// written back in UTC.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Ts(prost_types::Timestamp);

impl Serialize for Ts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_timestamp(&self.0))
    }
}

impl<'de> Deserialize<'de> for Ts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Ts, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Ts;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp such as 2026-12-01T00:00:00Z")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ts, E> {
                parse_timestamp(v).map(Ts).ok_or_else(|| {
                    E::custom(format_args!("invalid timestamp {v:?}: expected RFC 3339, e.g. 2026-12-01T00:00:00Z"))
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn parse_timestamp(s: &str) -> Option<prost_types::Timestamp> {
    fn num(s: &str) -> Option<i64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
    }
    let (date, rest) = s.split_once(['T', 't'])?;
    let (y, md) = date.rsplit_once('-').and_then(|(ym, d)| ym.split_once('-').map(|(y, m)| (y, (m, d))))?;
    if y.len() < 4 || md.0.len() != 2 || md.1.len() != 2 {
        return None;
    }
    let (year, month, day) = (num(y)?, num(md.0)?, num(md.1)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&month) || day < 1 || day > month_days[usize::try_from(month - 1).ok()?] {
        return None;
    }
    // time and offset
    let (time, offset) = if let Some(t) = rest.strip_suffix(['Z', 'z']) {
        (t, 0)
    } else {
        let at = rest.rfind(['+', '-'])?;
        let (t, off) = rest.split_at(at);
        let (oh, om) = off[1..].split_once(':')?;
        if oh.len() != 2 || om.len() != 2 || num(oh)? > 23 || num(om)? > 59 {
            return None;
        }
        let minutes = num(oh)? * 60 + num(om)?;
        (t, if off.starts_with('-') { -minutes } else { minutes })
    };
    let (hms, frac) = match time.split_once('.') {
        Some((hms, frac)) => (hms, Some(frac)),
        None => (time, None),
    };
    let parts: Vec<&str> = hms.split(':').collect();
    let [h, mi, se] = parts.as_slice() else {
        return None;
    };
    if h.len() != 2 || mi.len() != 2 || se.len() != 2 {
        return None;
    }
    let (h, mi, se) = (num(h)?, num(mi)?, num(se)?);
    if h > 23 || mi > 59 || se > 59 {
        return None;
    }
    let nanos = match frac {
        None => 0,
        Some(f) if f.len() > 9 => return None,
        Some(f) => num(f)? * 10_i64.pow(9 - u32::try_from(f.len()).ok()?),
    };
    let seconds = days_from_civil(year, month, day)
        .checked_mul(86_400)?
        .checked_add(h * 3600 + mi * 60 + se)?
        .checked_sub(offset * 60)?;
    Some(prost_types::Timestamp { seconds, nanos: i32::try_from(nanos).ok()? })
}

/// RFC 3339 in UTC, with as many fractional digits as needed (`2026-12-01T00:00:00.5Z`).
pub fn format_timestamp(t: &prost_types::Timestamp) -> String {
    let (days, secs) = (t.seconds.div_euclid(86_400), t.seconds.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let mut out = format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    if t.nanos != 0 {
        let frac = format!("{:09}", t.nanos);
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// A JSON document held as text in the proto (a JWK, a JWK Set). Written as a YAML mapping when
/// the text is serde_json's canonical rendering of an object or array (always, for what this
/// module produced); any other text is kept verbatim as a YAML string, so it round-trips too.
#[derive(Clone, Debug, PartialEq)]
struct Json(String);

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match serde_json::from_str::<serde_json::Value>(&self.0) {
            Ok(v @ (serde_json::Value::Object(_) | serde_json::Value::Array(_)))
                if serde_json::to_string(&v).is_ok_and(|c| c == self.0) =>
            {
                v.serialize(s)
            }
            _ => s.serialize_str(&self.0),
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(text) => Ok(Json(text)),
            v => serde_json::to_string(&v).map(Json).map_err(de::Error::custom),
        }
    }
}

/// A message with a `oneof`: deserializing it fails when more than one member is set.
trait OneOf {
    const MEMBERS: &'static [&'static str];
    fn set_members(&self) -> Vec<&'static str>;
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(transparent)]
struct Checked<T>(T);

impl<'de, T: Deserialize<'de> + OneOf> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Checked<T>, D::Error> {
        let v = T::deserialize(d)?;
        match v.set_members().as_slice() {
            [_, _, ..] => Err(de::Error::custom(format_args!(
                "only one of {} may be set, found {}",
                T::MEMBERS.join(", "),
                v.set_members().join(" and ")
            ))),
            _ => Ok(Checked(v)),
        }
    }
}

fn set_members(members: &[(&'static str, bool)]) -> Vec<&'static str> {
    members.iter().filter(|(_, set)| *set).map(|(m, _)| *m).collect()
}

/// Protobuf enums by their lower-case document names (`round_robin`, `report_only`).
macro_rules! doc_enum {
    ($doc:ident, $pb:ty, { $($variant:ident = $name:literal),+ $(,)? }) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
        enum $doc {
            $(#[serde(rename = $name)] $variant),+
        }

        impl $doc {
            fn to_proto(self) -> i32 {
                match self {
                    $($doc::$variant => <$pb>::$variant as i32),+
                }
            }

            /// `None` for `UNSPECIFIED` and unknown numbers.
            fn from_proto(v: i32) -> Option<$doc> {
                match <$pb>::try_from(v).ok()? {
                    $(<$pb>::$variant => Some($doc::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

doc_enum!(LoadBalancingDoc, pb::LoadBalancing, { RoundRobin = "round_robin", LeastRequest = "least_request" });
doc_enum!(PolicyModeDoc, pb::PolicyMode, { Enforce = "enforce", ReportOnly = "report_only" });
doc_enum!(AuthModeDoc, pb::AuthMode, { Required = "required", Optional = "optional", Public = "public" });
doc_enum!(TokenKindDoc, pb::TokenKind, { Jwt = "jwt", Opaque = "opaque" });
doc_enum!(RateLimitKeyDoc, pb::RateLimitKey, {
    ClientId = "client_id",
    Sub = "sub",
    Ip = "ip",
    Header = "header",
    Route = "route",
});
doc_enum!(RateLimitScopeDoc, pb::RateLimitScope, { Local = "local", Global = "global" });

fn sorted<'a>(map: impl IntoIterator<Item = (&'a String, &'a String)>) -> BTreeMap<String, String> {
    map.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

// ---------------------------------------------------------------- Upstream

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct UpstreamSpec {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    endpoints: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    load_balancing: Option<LoadBalancingDoc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connect_timeout: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_timeout: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    health_check: Option<HealthCheckDoc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<TlsDoc>,
    #[serde(skip_serializing_if = "is_false")]
    http2: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct HealthCheckDoc {
    #[serde(skip_serializing_if = "is_zero")]
    consecutive_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    ejection_time: Option<Dur>,
    #[serde(skip_serializing_if = "String::is_empty")]
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval: Option<Dur>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TlsDoc {
    #[serde(skip_serializing_if = "is_false")]
    enabled: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    server_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    ca_file: String,
}

impl UpstreamSpec {
    fn into_proto(self, name: String) -> pb::Upstream {
        pb::Upstream {
            name,
            revision: 0,
            endpoints: self.endpoints,
            load_balancing: self.load_balancing.map_or(0, LoadBalancingDoc::to_proto),
            connect_timeout: self.connect_timeout.map(|d| d.0),
            request_timeout: self.request_timeout.map(|d| d.0),
            health_check: self.health_check.map(|h| pb::HealthCheck {
                consecutive_failures: h.consecutive_failures,
                ejection_time: h.ejection_time.map(|d| d.0),
                path: h.path,
                interval: h.interval.map(|d| d.0),
            }),
            tls: self.tls.map(|t| pb::UpstreamTls {
                enabled: t.enabled,
                server_name: t.server_name,
                ca_file: t.ca_file,
            }),
            http2: self.http2,
        }
    }

    fn from_proto(p: &pb::Upstream) -> UpstreamSpec {
        UpstreamSpec {
            endpoints: p.endpoints.clone(),
            load_balancing: LoadBalancingDoc::from_proto(p.load_balancing),
            connect_timeout: opt_dur(p.connect_timeout.as_ref()),
            request_timeout: opt_dur(p.request_timeout.as_ref()),
            health_check: p.health_check.as_ref().map(|h| HealthCheckDoc {
                consecutive_failures: h.consecutive_failures,
                ejection_time: opt_dur(h.ejection_time.as_ref()),
                path: h.path.clone(),
                interval: opt_dur(h.interval.as_ref()),
            }),
            tls: p.tls.as_ref().map(|t| TlsDoc {
                enabled: t.enabled,
                server_name: t.server_name.clone(),
                ca_file: t.ca_file.clone(),
            }),
            http2: p.http2,
        }
    }
}

// ---------------------------------------------------------------- Issuer

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct IssuerSpec {
    #[serde(skip_serializing_if = "String::is_empty")]
    issuer: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    audiences: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    algorithms: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    clock_skew: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_token_age: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keys: Option<Checked<KeysDoc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    introspection: Option<IntrospectionDoc>,
    #[serde(skip_serializing_if = "is_false")]
    require_at_jwt: bool,
}

/// `keys:` — exactly the proto's `KeySource`, with `inline_jwks` written as `inline`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct KeysDoc {
    #[serde(skip_serializing_if = "Option::is_none")]
    jwks_uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    discovery: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inline: Option<Json>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shared_secret_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_interval: Option<Dur>,
}

impl OneOf for KeysDoc {
    const MEMBERS: &'static [&'static str] = &["jwks_uri", "discovery", "inline", "shared_secret_file"];
    fn set_members(&self) -> Vec<&'static str> {
        set_members(&[
            ("jwks_uri", self.jwks_uri.is_some()),
            ("discovery", self.discovery.is_some()),
            ("inline", self.inline.is_some()),
            ("shared_secret_file", self.shared_secret_file.is_some()),
        ])
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct IntrospectionDoc {
    #[serde(skip_serializing_if = "String::is_empty")]
    endpoint: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    client_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    client_secret_file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_ttl: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    negative_cache_ttl: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<Dur>,
}

impl IssuerSpec {
    fn into_proto(self, name: String) -> pb::Issuer {
        use pb::key_source::Source;
        pb::Issuer {
            name,
            revision: 0,
            issuer: self.issuer,
            audiences: self.audiences,
            algorithms: self.algorithms,
            clock_skew: self.clock_skew.map(|d| d.0),
            max_token_age: self.max_token_age.map(|d| d.0),
            keys: self.keys.map(|Checked(k)| pb::KeySource {
                source: (k.jwks_uri.map(Source::JwksUri))
                    .or(k.discovery.map(Source::Discovery))
                    .or(k.inline.map(|j| Source::InlineJwks(j.0)))
                    .or(k.shared_secret_file.map(Source::SharedSecretFile)),
                refresh_interval: k.refresh_interval.map(|d| d.0),
            }),
            introspection: self.introspection.map(|i| pb::Introspection {
                endpoint: i.endpoint,
                client_id: i.client_id,
                client_secret_file: i.client_secret_file,
                cache_ttl: i.cache_ttl.map(|d| d.0),
                negative_cache_ttl: i.negative_cache_ttl.map(|d| d.0),
                timeout: i.timeout.map(|d| d.0),
            }),
            require_at_jwt: self.require_at_jwt,
        }
    }

    fn from_proto(p: &pb::Issuer) -> IssuerSpec {
        use pb::key_source::Source;
        IssuerSpec {
            issuer: p.issuer.clone(),
            audiences: p.audiences.clone(),
            algorithms: p.algorithms.clone(),
            clock_skew: opt_dur(p.clock_skew.as_ref()),
            max_token_age: opt_dur(p.max_token_age.as_ref()),
            keys: p.keys.as_ref().map(|k| {
                let mut doc = KeysDoc { refresh_interval: opt_dur(k.refresh_interval.as_ref()), ..KeysDoc::default() };
                match &k.source {
                    Some(Source::JwksUri(u)) => doc.jwks_uri = Some(u.clone()),
                    Some(Source::Discovery(u)) => doc.discovery = Some(u.clone()),
                    Some(Source::InlineJwks(j)) => doc.inline = Some(Json(j.clone())),
                    Some(Source::SharedSecretFile(f)) => doc.shared_secret_file = Some(f.clone()),
                    None => {}
                }
                Checked(doc)
            }),
            introspection: p.introspection.as_ref().map(|i| IntrospectionDoc {
                endpoint: i.endpoint.clone(),
                client_id: i.client_id.clone(),
                client_secret_file: i.client_secret_file.clone(),
                cache_ttl: opt_dur(i.cache_ttl.as_ref()),
                negative_cache_ttl: opt_dur(i.negative_cache_ttl.as_ref()),
                timeout: opt_dur(i.timeout.as_ref()),
            }),
            require_at_jwt: p.require_at_jwt,
        }
    }
}

// ---------------------------------------------------------------- Key

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct KeySpec {
    #[serde(skip_serializing_if = "String::is_empty")]
    issuer: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    kid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    jwk: Option<Json>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retire_at: Option<Ts>,
}

impl KeySpec {
    fn into_proto(self, name: String) -> pb::Key {
        pb::Key {
            name,
            revision: 0,
            issuer: self.issuer,
            kid: self.kid,
            jwk: self.jwk.map(|j| j.0).unwrap_or_default(),
            retire_at: self.retire_at.map(|t| t.0),
        }
    }

    fn from_proto(p: &pb::Key) -> KeySpec {
        KeySpec {
            issuer: p.issuer.clone(),
            kid: p.kid.clone(),
            jwk: (!p.jwk.is_empty()).then(|| Json(p.jwk.clone())),
            retire_at: p.retire_at.map(Ts),
        }
    }
}

// ---------------------------------------------------------------- Policy

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PolicySpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    authentication: Option<AuthenticationDoc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authorization: Option<AuthorizationDoc>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rate_limits: Vec<RateLimitDoc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip_filter: Option<IpFilterDoc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    forwarding: Option<ForwardingDoc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<PolicyModeDoc>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct AuthenticationDoc {
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<AuthModeDoc>,
    #[serde(skip_serializing_if = "String::is_empty")]
    reason: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    issuers: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tokens: Vec<TokenKindDoc>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    strip_headers: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct AuthorizationDoc {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    required_scopes: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    claims: Vec<Checked<ClaimRuleDoc>>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ClaimRuleDoc {
    #[serde(skip_serializing_if = "String::is_empty")]
    claim: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    equals: Option<String>,
    #[serde(rename = "in", skip_serializing_if = "Option::is_none")]
    r#in: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    contains: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exists: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

impl OneOf for ClaimRuleDoc {
    const MEMBERS: &'static [&'static str] = &["equals", "in", "contains", "exists", "regex"];
    fn set_members(&self) -> Vec<&'static str> {
        set_members(&[
            ("equals", self.equals.is_some()),
            ("in", self.r#in.is_some()),
            ("contains", self.contains.is_some()),
            ("exists", self.exists.is_some()),
            ("regex", self.regex.is_some()),
        ])
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RateLimitDoc {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<RateLimitKeyDoc>,
    #[serde(skip_serializing_if = "String::is_empty")]
    header: String,
    #[serde(skip_serializing_if = "is_zero")]
    limit: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    window: Option<Dur>,
    #[serde(skip_serializing_if = "is_zero")]
    burst: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<RateLimitScopeDoc>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct IpFilterDoc {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allow: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    deny: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ForwardingDoc {
    #[serde(skip_serializing_if = "is_false")]
    forward_token: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    claim_headers: BTreeMap<String, String>,
}

impl PolicySpec {
    fn into_proto(self, name: String) -> pb::Policy {
        use pb::claim_rule::Op;
        pb::Policy {
            name,
            revision: 0,
            authentication: self.authentication.map(|a| pb::Authentication {
                mode: a.mode.map_or(0, AuthModeDoc::to_proto),
                reason: a.reason,
                issuers: a.issuers,
                tokens: a.tokens.into_iter().map(TokenKindDoc::to_proto).collect(),
                strip_headers: a.strip_headers,
            }),
            authorization: self.authorization.map(|a| pb::Authorization {
                required_scopes: a.required_scopes,
                claims: a
                    .claims
                    .into_iter()
                    .map(|Checked(c)| pb::ClaimRule {
                        claim: c.claim,
                        op: (c.equals.map(Op::Equals))
                            .or(c.r#in.map(|values| Op::In(pb::StringList { values })))
                            .or(c.contains.map(Op::Contains))
                            .or(c.exists.map(Op::Exists))
                            .or(c.regex.map(Op::Regex)),
                    })
                    .collect(),
            }),
            rate_limits: self
                .rate_limits
                .into_iter()
                .map(|r| pb::RateLimit {
                    key: r.key.map_or(0, RateLimitKeyDoc::to_proto),
                    header: r.header,
                    limit: r.limit,
                    window: r.window.map(|d| d.0),
                    burst: r.burst,
                    scope: r.scope.map_or(0, RateLimitScopeDoc::to_proto),
                })
                .collect(),
            ip_filter: self.ip_filter.map(|f| pb::IpFilter { allow: f.allow, deny: f.deny }),
            forwarding: self.forwarding.map(|f| pb::Forwarding {
                forward_token: f.forward_token,
                claim_headers: f.claim_headers.into_iter().collect(),
            }),
            mode: self.mode.map_or(0, PolicyModeDoc::to_proto),
        }
    }

    fn from_proto(p: &pb::Policy) -> PolicySpec {
        use pb::claim_rule::Op;
        PolicySpec {
            authentication: p.authentication.as_ref().map(|a| AuthenticationDoc {
                mode: AuthModeDoc::from_proto(a.mode),
                reason: a.reason.clone(),
                issuers: a.issuers.clone(),
                tokens: a.tokens.iter().filter_map(|t| TokenKindDoc::from_proto(*t)).collect(),
                strip_headers: a.strip_headers.clone(),
            }),
            authorization: p.authorization.as_ref().map(|a| AuthorizationDoc {
                required_scopes: a.required_scopes.clone(),
                claims: a
                    .claims
                    .iter()
                    .map(|c| {
                        let mut doc = ClaimRuleDoc { claim: c.claim.clone(), ..ClaimRuleDoc::default() };
                        match &c.op {
                            Some(Op::Equals(v)) => doc.equals = Some(v.clone()),
                            Some(Op::In(list)) => doc.r#in = Some(list.values.clone()),
                            Some(Op::Contains(v)) => doc.contains = Some(v.clone()),
                            Some(Op::Exists(v)) => doc.exists = Some(*v),
                            Some(Op::Regex(v)) => doc.regex = Some(v.clone()),
                            None => {}
                        }
                        Checked(doc)
                    })
                    .collect(),
            }),
            rate_limits: p
                .rate_limits
                .iter()
                .map(|r| RateLimitDoc {
                    key: RateLimitKeyDoc::from_proto(r.key),
                    header: r.header.clone(),
                    limit: r.limit,
                    window: opt_dur(r.window.as_ref()),
                    burst: r.burst,
                    scope: RateLimitScopeDoc::from_proto(r.scope),
                })
                .collect(),
            ip_filter: p.ip_filter.as_ref().map(|f| IpFilterDoc { allow: f.allow.clone(), deny: f.deny.clone() }),
            forwarding: p
                .forwarding
                .as_ref()
                .map(|f| ForwardingDoc { forward_token: f.forward_token, claim_headers: sorted(&f.claim_headers) }),
            mode: PolicyModeDoc::from_proto(p.mode),
        }
    }
}

// ---------------------------------------------------------------- Route

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RouteSpec {
    #[serde(rename = "match", skip_serializing_if = "Option::is_none")]
    r#match: Option<MatchDoc>,
    #[serde(skip_serializing_if = "String::is_empty")]
    upstream: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    policy: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    rewrite: Option<Checked<RewriteDoc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limits: Option<LimitsDoc>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct MatchDoc {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    hosts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    methods: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<Checked<PathDoc>>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PathDoc {
    #[serde(skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    template: Option<String>,
}

impl OneOf for PathDoc {
    const MEMBERS: &'static [&'static str] = &["exact", "prefix", "template"];
    fn set_members(&self) -> Vec<&'static str> {
        set_members(&[
            ("exact", self.exact.is_some()),
            ("prefix", self.prefix.is_some()),
            ("template", self.template.is_some()),
        ])
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RewriteDoc {
    #[serde(skip_serializing_if = "Option::is_none")]
    strip_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replace_prefix: Option<ReplacePrefixDoc>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    set_headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    remove_headers: Vec<String>,
}

impl OneOf for RewriteDoc {
    const MEMBERS: &'static [&'static str] = &["strip_prefix", "replace_prefix"];
    fn set_members(&self) -> Vec<&'static str> {
        set_members(&[("strip_prefix", self.strip_prefix.is_some()), ("replace_prefix", self.replace_prefix.is_some())])
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ReplacePrefixDoc {
    #[serde(skip_serializing_if = "String::is_empty")]
    prefix: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    replacement: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LimitsDoc {
    #[serde(skip_serializing_if = "is_zero")]
    max_body_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<Dur>,
}

impl RouteSpec {
    fn into_proto(self, name: String) -> pb::Route {
        use pb::path_match::Kind as PK;
        use pb::rewrite::Path as RP;
        pb::Route {
            name,
            revision: 0,
            r#match: self.r#match.map(|m| pb::RouteMatch {
                hosts: m.hosts,
                methods: m.methods,
                path: m.path.map(|Checked(p)| pb::PathMatch {
                    kind: (p.exact.map(PK::Exact)).or(p.prefix.map(PK::Prefix)).or(p.template.map(PK::Template)),
                }),
            }),
            upstream: self.upstream,
            policy: self.policy,
            rewrite: self.rewrite.map(|Checked(r)| pb::Rewrite {
                path: (r.strip_prefix.map(RP::StripPrefix)).or(r
                    .replace_prefix
                    .map(|p| RP::ReplacePrefix(pb::PrefixReplace { prefix: p.prefix, replacement: p.replacement }))),
                set_headers: r.set_headers.into_iter().collect(),
                remove_headers: r.remove_headers,
            }),
            limits: self
                .limits
                .map(|l| pb::RouteLimits { max_body_bytes: l.max_body_bytes, timeout: l.timeout.map(|d| d.0) }),
        }
    }

    fn from_proto(p: &pb::Route) -> RouteSpec {
        use pb::path_match::Kind as PK;
        use pb::rewrite::Path as RP;
        RouteSpec {
            r#match: p.r#match.as_ref().map(|m| MatchDoc {
                hosts: m.hosts.clone(),
                methods: m.methods.clone(),
                path: m.path.as_ref().map(|path| {
                    let mut doc = PathDoc::default();
                    match &path.kind {
                        Some(PK::Exact(s)) => doc.exact = Some(s.clone()),
                        Some(PK::Prefix(s)) => doc.prefix = Some(s.clone()),
                        Some(PK::Template(s)) => doc.template = Some(s.clone()),
                        None => {}
                    }
                    Checked(doc)
                }),
            }),
            upstream: p.upstream.clone(),
            policy: p.policy.clone(),
            rewrite: p.rewrite.as_ref().map(|r| {
                let mut doc = RewriteDoc {
                    set_headers: sorted(&r.set_headers),
                    remove_headers: r.remove_headers.clone(),
                    ..RewriteDoc::default()
                };
                match &r.path {
                    Some(RP::StripPrefix(s)) => doc.strip_prefix = Some(s.clone()),
                    Some(RP::ReplacePrefix(p)) => {
                        doc.replace_prefix =
                            Some(ReplacePrefixDoc { prefix: p.prefix.clone(), replacement: p.replacement.clone() });
                    }
                    None => {}
                }
                Checked(doc)
            }),
            limits: p
                .limits
                .as_ref()
                .map(|l| LimitsDoc { max_body_bytes: l.max_body_bytes, timeout: opt_dur(l.timeout.as_ref()) }),
        }
    }
}

// ---------------------------------------------------------------- Block

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct BlockSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cidr: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<Ts>,
}

impl OneOf for BlockSpec {
    const MEMBERS: &'static [&'static str] = &["client_id", "sub", "jti", "cidr"];
    fn set_members(&self) -> Vec<&'static str> {
        set_members(&[
            ("client_id", self.client_id.is_some()),
            ("sub", self.sub.is_some()),
            ("jti", self.jti.is_some()),
            ("cidr", self.cidr.is_some()),
        ])
    }
}

impl BlockSpec {
    fn into_proto(self, name: String) -> pb::Block {
        use pb::block::Target;
        pb::Block {
            name,
            revision: 0,
            target: (self.client_id.map(Target::ClientId))
                .or(self.sub.map(Target::Sub))
                .or(self.jti.map(Target::Jti))
                .or(self.cidr.map(Target::Cidr)),
            reason: self.reason,
            expires_at: self.expires_at.map(|t| t.0),
        }
    }

    fn from_proto(p: &pb::Block) -> BlockSpec {
        use pb::block::Target;
        let mut doc = BlockSpec { reason: p.reason.clone(), expires_at: p.expires_at.map(Ts), ..BlockSpec::default() };
        match &p.target {
            Some(Target::ClientId(v)) => doc.client_id = Some(v.clone()),
            Some(Target::Sub(v)) => doc.sub = Some(v.clone()),
            Some(Target::Jti(v)) => doc.jti = Some(v.clone()),
            Some(Target::Cidr(v)) => doc.cidr = Some(v.clone()),
            None => {}
        }
        doc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An expected error: (document index, kind, name, field, part of the message).
    type WantError<'a> = (usize, Option<&'a str>, Option<&'a str>, &'a str, &'a str);

    /// What `check` expects from parsing a text named `test.yaml`.
    enum Want<'a> {
        /// These resources, which must also survive `to_yaml`/`parse_documents` exactly.
        Docs(Vec<pb::Resource>),
        Errors(&'a [WantError<'a>]),
    }

    fn check(input: &str, want: Want<'_>) {
        let got = parse_documents(input, "test.yaml");
        match want {
            Want::Docs(docs) => {
                let got = got.unwrap_or_else(|e| panic!("{input}\n{e:#?}"));
                assert_eq!(got, docs, "{input}");
                assert_eq!(parse_documents(input, "test.yaml").unwrap(), got, "parsing twice differs");
                let yaml = to_yaml(&got);
                assert_eq!(parse_documents(&yaml, "out.yaml").unwrap(), got, "yaml round trip:\n{yaml}");
                assert_eq!(to_yaml(&parse_documents(&yaml, "out.yaml").unwrap()), yaml, "export is not stable");
                let json: serde_json::Value = serde_json::from_str(&to_json(&got)).unwrap();
                assert_eq!(json.as_array().map(Vec::len), Some(got.len()));
                // JSON is YAML: every JSON document parses back to the same resource
                for (doc, r) in json.as_array().unwrap().iter().zip(&got) {
                    assert_eq!(parse_documents(&doc.to_string(), "j").unwrap(), vec![r.clone()], "json round trip");
                    assert_eq!(&doc["spec"], &spec_json(r));
                }
            }
            Want::Errors(errors) => {
                let got = got.expect_err(input);
                let summary: Vec<String> = got.iter().map(ToString::to_string).collect();
                assert_eq!(got.len(), errors.len(), "{input}\n{summary:#?}");
                for ((index, kind, name, field, message), e) in errors.iter().zip(&got) {
                    assert_eq!(e.source, "test.yaml");
                    assert_eq!(
                        (e.index, e.kind.as_deref(), e.name.as_deref(), e.field.as_str()),
                        (*index, *kind, *name, *field),
                        "{e}"
                    );
                    assert!(e.message.contains(message), "{e}: wanted {message:?}");
                    assert!(e.to_string().starts_with(&format!("test.yaml: document {index}")), "{e}");
                }
            }
        }
    }

    fn dur(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
        Some(prost_types::Duration { seconds, nanos })
    }

    fn ts(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos })
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn res(kind: pb::resource::Kind) -> pb::Resource {
        pb::Resource { kind: Some(kind) }
    }

    const EXAMPLE: &str = r#"
kind: Upstream
name: orders
spec:
  endpoints: ["127.0.0.1:9000"]
  load_balancing: least_request
  connect_timeout: 5s
  request_timeout: 1m30s
  health_check: {consecutive_failures: 5, ejection_time: 10s, path: /health, interval: 250ms}
  tls: {enabled: true, server_name: orders.internal, ca_file: /etc/ca.pem}
  http2: true
---
kind: issuer
name: corp-idp
spec:
  issuer: https://idp.example.com/
  audiences: [api://orders]
  algorithms: [RS256, ES256]
  keys:
    inline: {keys: [{kty: RSA, n: abc, e: AQAB, kid: k1}]}
    refresh_interval: 5m
  clock_skew: 60s
  max_token_age: 1h
  introspection: {endpoint: https://idp.example.com/introspect, client_id: gw, client_secret_file: /run/secrets/gw, cache_ttl: 5m, negative_cache_ttl: 5s, timeout: 2s}
  require_at_jwt: true
---
# a comment between documents
kind: Key
name: corp-idp-k1
spec: {issuer: corp-idp, kid: k1, jwk: {kty: RSA, n: "abc", e: AQAB, kid: k1}, retire_at: "2026-12-01T00:00:00Z"}
---
kind: Policy
name: orders-read
spec:
  authentication: {mode: required, issuers: [corp-idp], tokens: [jwt, opaque], strip_headers: [x-user]}
  authorization:
    required_scopes: [orders:read]
    claims: [{claim: tenant, equals: acme}, {claim: roles, in: [admin, ops]}, {claim: groups, contains: x}, {claim: email_verified, exists: true}, {claim: sub, regex: "^u-[0-9]+$"}]
  rate_limits: [{key: client_id, limit: 100, window: 1s, burst: 20, scope: global}, {key: header, header: X-Api-Key, limit: 5, window: 1m}]
  ip_filter: {allow: [10.0.0.0/8], deny: [10.1.0.0/16]}
  forwarding: {forward_token: true, claim_headers: {sub: x-user-id, tenant: x-tenant}}
  mode: report_only
---
kind: Route
name: orders-health
spec:
  match: {hosts: ["*"], methods: [GET], path: {exact: /health}}
  upstream: orders
  policy: health-public
  rewrite: {strip_prefix: /api, set_headers: {x-env: prod}, remove_headers: [x-debug]}
  limits: {max_body_bytes: 1048576, timeout: 10s}
---
kind: Route
name: users
spec:
  match: {path: {template: "/users/{id}"}}
  upstream: orders
  policy: orders-read
  rewrite: {replace_prefix: {prefix: /users, replacement: /v2/users}}
---
kind: Block
name: rogue-client
spec: {client_id: evil-app, reason: "credential stuffing", expires_at: "2026-12-01T00:00:00Z"}
---
kind: Block
name: rogue-net
spec: {cidr: 192.0.2.0/24, reason: scanner}
"#;

    fn example() -> Vec<pb::Resource> {
        use pb::resource::Kind as K;
        let dec_1 = ts(1_796_083_200, 0);
        vec![
            res(K::Upstream(pb::Upstream {
                name: "orders".into(),
                endpoints: strings(&["127.0.0.1:9000"]),
                load_balancing: pb::LoadBalancing::LeastRequest as i32,
                connect_timeout: dur(5, 0),
                request_timeout: dur(90, 0),
                health_check: Some(pb::HealthCheck {
                    consecutive_failures: 5,
                    ejection_time: dur(10, 0),
                    path: "/health".into(),
                    interval: dur(0, 250_000_000),
                }),
                tls: Some(pb::UpstreamTls {
                    enabled: true,
                    server_name: "orders.internal".into(),
                    ca_file: "/etc/ca.pem".into(),
                }),
                http2: true,
                ..Default::default()
            })),
            res(K::Issuer(pb::Issuer {
                name: "corp-idp".into(),
                issuer: "https://idp.example.com/".into(),
                audiences: strings(&["api://orders"]),
                algorithms: strings(&["RS256", "ES256"]),
                clock_skew: dur(60, 0),
                max_token_age: dur(3600, 0),
                keys: Some(pb::KeySource {
                    source: Some(pb::key_source::Source::InlineJwks(
                        r#"{"keys":[{"e":"AQAB","kid":"k1","kty":"RSA","n":"abc"}]}"#.into(),
                    )),
                    refresh_interval: dur(300, 0),
                }),
                introspection: Some(pb::Introspection {
                    endpoint: "https://idp.example.com/introspect".into(),
                    client_id: "gw".into(),
                    client_secret_file: "/run/secrets/gw".into(),
                    cache_ttl: dur(300, 0),
                    negative_cache_ttl: dur(5, 0),
                    timeout: dur(2, 0),
                }),
                require_at_jwt: true,
                ..Default::default()
            })),
            res(K::Key(pb::Key {
                name: "corp-idp-k1".into(),
                issuer: "corp-idp".into(),
                kid: "k1".into(),
                jwk: r#"{"e":"AQAB","kid":"k1","kty":"RSA","n":"abc"}"#.into(),
                retire_at: dec_1,
                ..Default::default()
            })),
            res(K::Policy(pb::Policy {
                name: "orders-read".into(),
                authentication: Some(pb::Authentication {
                    mode: pb::AuthMode::Required as i32,
                    issuers: strings(&["corp-idp"]),
                    tokens: vec![pb::TokenKind::Jwt as i32, pb::TokenKind::Opaque as i32],
                    strip_headers: strings(&["x-user"]),
                    ..Default::default()
                }),
                authorization: Some(pb::Authorization {
                    required_scopes: strings(&["orders:read"]),
                    claims: {
                        use pb::claim_rule::Op;
                        let rule = |claim: &str, op| pb::ClaimRule { claim: claim.into(), op: Some(op) };
                        vec![
                            rule("tenant", Op::Equals("acme".into())),
                            rule("roles", Op::In(pb::StringList { values: strings(&["admin", "ops"]) })),
                            rule("groups", Op::Contains("x".into())),
                            rule("email_verified", Op::Exists(true)),
                            rule("sub", Op::Regex("^u-[0-9]+$".into())),
                        ]
                    },
                }),
                rate_limits: vec![
                    pb::RateLimit {
                        key: pb::RateLimitKey::ClientId as i32,
                        limit: 100,
                        window: dur(1, 0),
                        burst: 20,
                        scope: pb::RateLimitScope::Global as i32,
                        ..Default::default()
                    },
                    pb::RateLimit {
                        key: pb::RateLimitKey::Header as i32,
                        header: "X-Api-Key".into(),
                        limit: 5,
                        window: dur(60, 0),
                        ..Default::default()
                    },
                ],
                ip_filter: Some(pb::IpFilter { allow: strings(&["10.0.0.0/8"]), deny: strings(&["10.1.0.0/16"]) }),
                forwarding: Some(pb::Forwarding {
                    forward_token: true,
                    claim_headers: [("sub", "x-user-id"), ("tenant", "x-tenant")]
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect(),
                }),
                mode: pb::PolicyMode::ReportOnly as i32,
                ..Default::default()
            })),
            res(K::Route(pb::Route {
                name: "orders-health".into(),
                r#match: Some(pb::RouteMatch {
                    hosts: strings(&["*"]),
                    methods: strings(&["GET"]),
                    path: Some(pb::PathMatch { kind: Some(pb::path_match::Kind::Exact("/health".into())) }),
                }),
                upstream: "orders".into(),
                policy: "health-public".into(),
                rewrite: Some(pb::Rewrite {
                    path: Some(pb::rewrite::Path::StripPrefix("/api".into())),
                    set_headers: [("x-env".to_owned(), "prod".to_owned())].into_iter().collect(),
                    remove_headers: strings(&["x-debug"]),
                }),
                limits: Some(pb::RouteLimits { max_body_bytes: 1_048_576, timeout: dur(10, 0) }),
                ..Default::default()
            })),
            res(K::Route(pb::Route {
                name: "users".into(),
                r#match: Some(pb::RouteMatch {
                    path: Some(pb::PathMatch { kind: Some(pb::path_match::Kind::Template("/users/{id}".into())) }),
                    ..Default::default()
                }),
                upstream: "orders".into(),
                policy: "orders-read".into(),
                rewrite: Some(pb::Rewrite {
                    path: Some(pb::rewrite::Path::ReplacePrefix(pb::PrefixReplace {
                        prefix: "/users".into(),
                        replacement: "/v2/users".into(),
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            res(K::Block(pb::Block {
                name: "rogue-client".into(),
                target: Some(pb::block::Target::ClientId("evil-app".into())),
                reason: "credential stuffing".into(),
                expires_at: dec_1,
                ..Default::default()
            })),
            res(K::Block(pb::Block {
                name: "rogue-net".into(),
                target: Some(pb::block::Target::Cidr("192.0.2.0/24".into())),
                reason: "scanner".into(),
                ..Default::default()
            })),
        ]
    }

    /// Values only the API (or an unusual document) produces: present-but-empty messages and
    /// oneof members, zero and sub-millisecond durations, fractional timestamps, strings that
    /// YAML would read as something else, JSON text that is not serde_json's canonical form.
    fn edge_cases() -> Vec<pb::Resource> {
        use pb::resource::Kind as K;
        vec![
            res(K::Upstream(pb::Upstream {
                name: "u".into(),
                endpoints: strings(&["true", "1", "null", "~", "", " padded ", "a: b", "#x", "multi\nline", "é"]),
                connect_timeout: dur(0, 0),
                request_timeout: dur(1, 1_500),
                health_check: Some(pb::HealthCheck::default()),
                tls: Some(pb::UpstreamTls::default()),
                ..Default::default()
            })),
            res(K::Upstream(pb::Upstream {
                name: "empty".into(),
                connect_timeout: dur(0, 2_000),
                request_timeout: dur(86_400 * 365 * 1000, 999_999_999),
                ..Default::default()
            })),
            res(K::Issuer(pb::Issuer {
                name: "i".into(),
                keys: Some(pb::KeySource {
                    source: Some(pb::key_source::Source::InlineJwks("{ \"keys\": [] }".into())),
                    refresh_interval: None,
                }),
                introspection: Some(pb::Introspection::default()),
                ..Default::default()
            })),
            res(K::Issuer(pb::Issuer {
                name: "i2".into(),
                keys: Some(pb::KeySource::default()),
                ..Default::default()
            })),
            res(K::Issuer(pb::Issuer {
                name: "i3".into(),
                keys: Some(pb::KeySource {
                    source: Some(pb::key_source::Source::InlineJwks(String::new())),
                    refresh_interval: dur(0, 0),
                }),
                ..Default::default()
            })),
            res(K::Issuer(pb::Issuer {
                name: "i4".into(),
                keys: Some(pb::KeySource {
                    source: Some(pb::key_source::Source::SharedSecretFile("/s".into())),
                    refresh_interval: None,
                }),
                ..Default::default()
            })),
            res(K::Key(pb::Key {
                name: "k".into(),
                jwk: r#"{"kty":"EC","x":1.5,"big":18446744073709551615,"nested":{"b":[null,true],"a":"1"}}"#.into(),
                retire_at: ts(1_796_083_200, 500_000_000),
                ..Default::default()
            })),
            res(K::Key(pb::Key {
                name: "k2".into(),
                jwk: "\"just a string\"".into(),
                retire_at: ts(0, 1),
                ..Default::default()
            })),
            res(K::Key(pb::Key { name: "k3".into(), jwk: "[1,2]".into(), ..Default::default() })),
            res(K::Policy(pb::Policy {
                name: "p".into(),
                authentication: Some(pb::Authentication::default()),
                authorization: Some(pb::Authorization {
                    required_scopes: vec![],
                    claims: vec![
                        pb::ClaimRule::default(),
                        pb::ClaimRule {
                            claim: "c".into(),
                            op: Some(pb::claim_rule::Op::In(pb::StringList::default())),
                        },
                        pb::ClaimRule { claim: "d".into(), op: Some(pb::claim_rule::Op::Exists(false)) },
                        pb::ClaimRule { claim: "e".into(), op: Some(pb::claim_rule::Op::Equals(String::new())) },
                    ],
                }),
                rate_limits: vec![pb::RateLimit::default()],
                ip_filter: Some(pb::IpFilter::default()),
                forwarding: Some(pb::Forwarding::default()),
                mode: pb::PolicyMode::Enforce as i32,
                ..Default::default()
            })),
            res(K::Route(pb::Route {
                name: "r".into(),
                r#match: Some(pb::RouteMatch { path: Some(pb::PathMatch::default()), ..Default::default() }),
                rewrite: Some(pb::Rewrite {
                    path: Some(pb::rewrite::Path::ReplacePrefix(pb::PrefixReplace::default())),
                    ..Default::default()
                }),
                limits: Some(pb::RouteLimits { max_body_bytes: u64::MAX, timeout: dur(0, 0) }),
                ..Default::default()
            })),
            res(K::Route(pb::Route {
                name: "r2".into(),
                r#match: Some(pb::RouteMatch::default()),
                rewrite: Some(pb::Rewrite::default()),
                limits: Some(pb::RouteLimits::default()),
                ..Default::default()
            })),
            res(K::Block(pb::Block {
                name: "b".into(),
                target: Some(pb::block::Target::Jti(String::new())),
                ..Default::default()
            })),
            res(K::Block(pb::Block { name: "b2".into(), ..Default::default() })),
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        check(EXAMPLE, Want::Docs(example()));
        let edge = edge_cases();
        check(&to_yaml(&edge), Want::Docs(edge));
    }

    #[test]
    fn revisions_are_not_written() {
        let mut r = example().remove(0);
        crate::kind::ResourceExt::set_revision(&mut r, 42);
        let yaml = to_yaml(&[r]);
        assert!(!yaml.contains("revision"), "{yaml}");
        assert!(yaml.starts_with("kind: Upstream\nname: orders\nspec:\n"), "{yaml}");
    }

    #[test]
    fn empty_documents_are_ignored_but_counted() {
        let upstream =
            |name: &str| res(pb::resource::Kind::Upstream(pb::Upstream { name: name.into(), ..Default::default() }));
        check("", Want::Docs(vec![]));
        check("---\n---\n# nothing\n", Want::Docs(vec![]));
        check(
            "---\nkind: Upstream\nname: a\n---\n---\nkind: upstream\nname: b\nspec:\n",
            Want::Docs(vec![upstream("a"), upstream("b")]),
        );
        let located = parse_located("kind: Upstream\nname: a\n---\n---\nkind: Upstream\nname: b\n", "f").unwrap();
        assert_eq!(located.iter().map(|d| d.index).collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn errors_name_the_document_and_field() {
        let route = |spec: &str| format!("kind: Route\nname: r\nspec:\n{spec}");
        let cases: &[(String, &[WantError<'_>])] = &[
            (route("  upstream: u\n  polcy: p\n"), &[(1, Some("Route"), Some("r"), "spec.polcy", "unknown field `polcy`")]),
            (route("  match: {path: {exact: /, regexp: x}}\n"), &[(1, Some("Route"), Some("r"), "spec.match.path.regexp", "unknown field `regexp`")]),
            ("kind: Route\nname: r\nrevision: 3\n".into(), &[(1, Some("Route"), Some("r"), "revision", "unknown field `revision`")]),
            ("kind: Upstream\nname: u\nspec: {endpoints: 5}\n".into(), &[(1, Some("Upstream"), Some("u"), "spec.endpoints", "invalid type")]),
            ("kind: Upstream\nname: u\nspec: {endpoints: [[a]]}\n".into(), &[(1, Some("Upstream"), Some("u"), "spec.endpoints[0]", "invalid type")]),
            ("kind: Upstream\nname: u\nspec: {http2: maybe}\n".into(), &[(1, Some("Upstream"), Some("u"), "spec.http2", "invalid type")]),
            ("kind: Upstream\nname: u\nspec:\n  connect_timeout: 5 s\n".into(), &[(1, Some("Upstream"), Some("u"), "spec.connect_timeout", "invalid duration \"5 s\"")]),
            ("kind: Upstream\nname: u\nspec:\n  health_check: {interval: 5}\n".into(), &[(1, Some("Upstream"), Some("u"), "spec.health_check.interval", "invalid duration \"5\"")]),
            ("kind: Upstream\nname: u\nspec: {load_balancing: random}\n".into(), &[(1, Some("Upstream"), Some("u"), "spec.load_balancing", "unknown variant `random`")]),
            ("kind: Policy\nname: p\nspec: {authentication: {mode: REQUIRED}}\n".into(), &[(1, Some("Policy"), Some("p"), "spec.authentication.mode", "expected one of `required`, `optional`, `public`")]),
            ("kind: Policy\nname: p\nspec: {authorization: {claims: [{claim: a, equals: b}, {claim: a, equals: b, regex: c}]}}\n".into(), &[(1, Some("Policy"), Some("p"), "spec.authorization.claims[1]", "only one of equals, in, contains, exists, regex may be set, found equals and regex")]),
            ("name: x\nspec: {}\n".into(), &[(1, None, Some("x"), "kind", "missing: expected one of Upstream, Issuer, Key, Policy, Route, Block")]),
            ("kind: Router\nname: x\n".into(), &[(1, Some("Router"), Some("x"), "kind", "unknown kind \"Router\"")]),
            ("kind: [Route]\nname: x\n".into(), &[(1, None, Some("x"), "kind", "must be a string")]),
            ("kind: Route\nspec: {}\n".into(), &[(1, Some("Route"), None, "name", "missing")]),
            ("kind: Route\nname: [r]\n".into(), &[(1, Some("Route"), None, "name", "invalid type: sequence, expected a string")]),
            ("- kind: Route\n".into(), &[(1, None, None, "", "a document must be a mapping")]),
            ("kind: Issuer\nname: i\nspec:\n  keys: {jwks_uri: https://a/, discovery: https://a/}\n".into(), &[(1, Some("Issuer"), Some("i"), "spec.keys", "only one of jwks_uri, discovery, inline, shared_secret_file may be set, found jwks_uri and discovery")]),
            (route("  rewrite: {strip_prefix: /a, replace_prefix: {prefix: /a}}\n"), &[(1, Some("Route"), Some("r"), "spec.rewrite", "found strip_prefix and replace_prefix")]),
            ("kind: Block\nname: b\nspec: {client_id: a, sub: b, reason: x}\n".into(), &[(1, Some("Block"), Some("b"), "spec", "found client_id and sub")]),
            ("kind: Block\nname: b\nspec: {jti: a, expires_at: tomorrow}\n".into(), &[(1, Some("Block"), Some("b"), "spec.expires_at", "invalid timestamp \"tomorrow\"")]),
            ("kind: Key\nname: k\nspec: {retire_at: \"2026-02-30T00:00:00Z\"}\n".into(), &[(1, Some("Key"), Some("k"), "spec.retire_at", "invalid timestamp")]),
            // a syntax error ends the stream: what follows cannot be delimited
            ("kind: Block\nname: ok\n---\nkind: Route\nname: r\nspec: {upstream: [\n---\nkind: Nope\n".into(), &[(2, None, None, "", "line 7")]),
            ("kind: Upstream\nname: a\nname: b\n---\nkind: Nope\nname: x\n".into(), &[(1, None, None, "", "duplicate entry with key \"name\""), (2, Some("Nope"), Some("x"), "kind", "unknown kind")]),
            ("kind: Upstream\nname: *a\n---\nkind: Nope\nname: x\n".into(), &[(1, None, None, "", "unknown anchor at line 2")]),
            ("kind: Upstream\nname: a\n---\nkind: Route\nname: b\n  spec: {}\n---\nkind: Nope\n".into(), &[(2, None, None, "", "mapping values are not allowed in this context at line 6 column 7")]),
            // every bad document is reported, not only the first
            (
                "kind: Upstream\nname: good\n---\nkind: Upstream\nname: u1\nspec: {bogus: 1}\n---\nkind: Nope\nname: n\n---\nkind: Route\nname: r\nspec: {limits: {timeout: soon}}\n".into(),
                &[
                    (2, Some("Upstream"), Some("u1"), "spec.bogus", "unknown field"),
                    (3, Some("Nope"), Some("n"), "kind", "unknown kind"),
                    (4, Some("Route"), Some("r"), "spec.limits.timeout", "invalid duration \"soon\""),
                ],
            ),
        ];
        for (input, errors) in cases {
            check(input, Want::Errors(errors));
        }
    }

    #[test]
    fn errors_display_with_location() {
        let e =
            parse_documents("kind: Upstream\nname: u\nspec:\n  connect_timeout: 5 s\n", "deploy/x.yaml").unwrap_err();
        assert_eq!(
            e[0].to_string(),
            "deploy/x.yaml: document 1 (Upstream u): spec.connect_timeout: invalid duration \"5 s\": expected a number and a unit (ms, s, m, h), e.g. 250ms or 1m30s at line 4 column 20"
        );
        let e = parse_documents("kind: Route\nname: r\nspec:\n  match: {path: {exact: /, regexp: x}}\n", "r.yaml")
            .unwrap_err();
        assert_eq!(
            e[0].to_string(),
            "r.yaml: document 1 (Route r): spec.match.path.regexp: unknown field `regexp`, expected one of `exact`, `prefix`, `template` at line 4 column 28"
        );
        let e = parse_documents("kind: Issuer\nname: i\nspec:\n  keys: {jwks_uri: a, inline: b}\n", "-").unwrap_err();
        assert_eq!(
            e[0].to_string(),
            "-: document 1 (Issuer i): spec.keys: only one of jwks_uri, discovery, inline, shared_secret_file may be set, found jwks_uri and inline at line 4 column 3"
        );
        let bare = DocumentError {
            source: "-".into(),
            index: 2,
            kind: None,
            name: None,
            field: String::new(),
            message: "invalid YAML".into(),
        };
        assert_eq!(bare.to_string(), "-: document 2: invalid YAML");
    }

    #[test]
    fn durations() {
        for (text, want) in [
            ("0s", Some((0, 0))),
            ("250ms", Some((0, 250_000_000))),
            ("1m30s", Some((90, 0))),
            ("1s500us", Some((1, 500_000))),
            ("3ns", Some((0, 3))),
            ("5 s", None),
            ("5", None),
            ("-1s", None),
        ] {
            let got = parse_duration(text).ok().map(|d| (d.seconds, d.nanos));
            assert_eq!(got, want, "{text}");
            if let Some((seconds, nanos)) = want {
                assert_eq!(format_duration(&prost_types::Duration { seconds, nanos }), text);
            }
        }
    }

    #[test]
    fn timestamps() {
        for (text, want) in [
            ("1970-01-01T00:00:00Z", Some((0, 0))),
            ("2026-12-01T00:00:00Z", Some((1_796_083_200, 0))),
            ("2026-12-01T02:00:00+02:00", Some((1_796_083_200, 0))),
            ("2026-11-30T23:30:00.25-00:30", Some((1_796_083_200, 250_000_000))),
            ("2024-02-29t12:00:00z", Some((1_709_208_000, 0))),
            ("1969-12-31T23:59:59Z", Some((-1, 0))),
            ("2023-02-29T00:00:00Z", None),
            ("2026-12-01 00:00:00Z", None),
            ("2026-12-01T00:00:00", None),
            ("2026-12-01T24:00:00Z", None),
            ("2026-12-01T00:00:00.1234567891Z", None),
            ("26-12-01T00:00:00Z", None),
            ("2026-1-01T00:00:00Z", None),
        ] {
            assert_eq!(parse_timestamp(text).map(|t| (t.seconds, t.nanos)), want, "{text}");
        }
        // every second of a few years, at a stride, and across the epoch
        for seconds in (-86_400 * 800..86_400 * 366 * 60).step_by(7_777_777).chain([253_402_300_799]) {
            for nanos in [0, 1, 120_000_000, 999_999_999] {
                let t = prost_types::Timestamp { seconds, nanos };
                assert_eq!(parse_timestamp(&format_timestamp(&t)), Some(t), "{}", format_timestamp(&t));
            }
        }
        assert_eq!(
            format_timestamp(&prost_types::Timestamp { seconds: 253_402_300_799, nanos: 0 }),
            "9999-12-31T23:59:59Z"
        );
    }
}
