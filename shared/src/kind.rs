//! Resource kinds: their names in etcd keys, YAML documents and the admin API.

use std::fmt;
use std::str::FromStr;

use portcullis_proto::admin::v1 as admin;
use portcullis_proto::config::v1 as pb;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Upstream,
    Issuer,
    Key,
    Policy,
    Route,
    Block,
}

impl Kind {
    /// Every kind, in dependency order: a kind only refers to kinds before it.
    pub const ALL: [Kind; 6] = [Kind::Upstream, Kind::Issuer, Kind::Key, Kind::Policy, Kind::Route, Kind::Block];

    /// Lower-case name, used in etcd keys (`/portcullis/v1/<kind>/<name>`) and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Upstream => "upstream",
            Kind::Issuer => "issuer",
            Kind::Key => "key",
            Kind::Policy => "policy",
            Kind::Route => "route",
            Kind::Block => "block",
        }
    }

    /// Capitalised name used in YAML documents (`kind: Route`).
    pub fn document_name(self) -> &'static str {
        match self {
            Kind::Upstream => "Upstream",
            Kind::Issuer => "Issuer",
            Kind::Key => "Key",
            Kind::Policy => "Policy",
            Kind::Route => "Route",
            Kind::Block => "Block",
        }
    }

    pub fn to_proto(self) -> admin::Kind {
        match self {
            Kind::Upstream => admin::Kind::Upstream,
            Kind::Issuer => admin::Kind::Issuer,
            Kind::Key => admin::Kind::Key,
            Kind::Policy => admin::Kind::Policy,
            Kind::Route => admin::Kind::Route,
            Kind::Block => admin::Kind::Block,
        }
    }

    /// `None` for `KIND_UNSPECIFIED` and unknown numbers.
    pub fn from_proto(value: i32) -> Option<Kind> {
        match admin::Kind::try_from(value).ok()? {
            admin::Kind::Unspecified => None,
            admin::Kind::Upstream => Some(Kind::Upstream),
            admin::Kind::Issuer => Some(Kind::Issuer),
            admin::Kind::Key => Some(Kind::Key),
            admin::Kind::Policy => Some(Kind::Policy),
            admin::Kind::Route => Some(Kind::Route),
            admin::Kind::Block => Some(Kind::Block),
        }
    }

    /// The kind and name of a resource message; `None` when the oneof is empty.
    pub fn of(resource: &pb::Resource) -> Option<(Kind, &str)> {
        use pb::resource::Kind as K;
        Some(match resource.kind.as_ref()? {
            K::Upstream(r) => (Kind::Upstream, r.name.as_str()),
            K::Issuer(r) => (Kind::Issuer, r.name.as_str()),
            K::Key(r) => (Kind::Key, r.name.as_str()),
            K::Policy(r) => (Kind::Policy, r.name.as_str()),
            K::Route(r) => (Kind::Route, r.name.as_str()),
            K::Block(r) => (Kind::Block, r.name.as_str()),
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown kind {0:?}: expected one of Upstream, Issuer, Key, Policy, Route, Block")]
pub struct UnknownKind(pub String);

impl FromStr for Kind {
    type Err = UnknownKind;

    /// Accepts `Route`, `route`, `routes` (what an operator types on the command line).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        let singular = lower
            .strip_suffix("ies")
            .map(|stem| format!("{stem}y"))
            .or_else(|| lower.strip_suffix('s').map(str::to_owned))
            .unwrap_or_else(|| lower.clone());
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == lower || k.as_str() == singular)
            .ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

/// Accessors common to every resource message.
pub trait ResourceExt {
    fn kind_name(&self) -> Option<(Kind, &str)>;
    fn revision(&self) -> i64;
    fn set_revision(&mut self, revision: i64);
}

impl ResourceExt for pb::Resource {
    fn kind_name(&self) -> Option<(Kind, &str)> {
        Kind::of(self)
    }

    fn revision(&self) -> i64 {
        use pb::resource::Kind as K;
        match &self.kind {
            Some(K::Upstream(r)) => r.revision,
            Some(K::Issuer(r)) => r.revision,
            Some(K::Key(r)) => r.revision,
            Some(K::Policy(r)) => r.revision,
            Some(K::Route(r)) => r.revision,
            Some(K::Block(r)) => r.revision,
            None => 0,
        }
    }

    fn set_revision(&mut self, revision: i64) {
        use pb::resource::Kind as K;
        match &mut self.kind {
            Some(K::Upstream(r)) => r.revision = revision,
            Some(K::Issuer(r)) => r.revision = revision,
            Some(K::Key(r)) => r.revision = revision,
            Some(K::Policy(r)) => r.revision = revision,
            Some(K::Route(r)) => r.revision = revision,
            Some(K::Block(r)) => r.revision = revision,
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_operators_type() {
        for (input, want) in [
            ("Route", Some(Kind::Route)),
            ("routes", Some(Kind::Route)),
            ("policies", Some(Kind::Policy)),
            ("policy", Some(Kind::Policy)),
            ("UPSTREAM", Some(Kind::Upstream)),
            ("keys", Some(Kind::Key)),
            ("router", None),
            ("", None),
        ] {
            assert_eq!(input.parse::<Kind>().ok(), want, "{input}");
        }
    }

    #[test]
    fn proto_round_trip() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_proto(k.to_proto() as i32), Some(k));
        }
        assert_eq!(Kind::from_proto(0), None);
        assert_eq!(Kind::from_proto(99), None);
    }
}
