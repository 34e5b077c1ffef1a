//! The route table: compiled once per configuration version from the validated routes, then
//! shared read-only by every request to find the route for a (host, method, path).
//!
//! Shape: host buckets — exact hosts in a hash map, wildcard hosts (`*.example.com`) in a hash
//! map keyed by their suffix and probed label by label, and one any-host bucket. A bucket holds
//! its exact routes in a hash map keyed by the whole path, and a segment trie for prefix and
//! template routes: literal children by segment, at most one parameter child, and the routes
//! that end on each node. A lookup costs one probe for the exact path plus one per path segment
//! in each bucket it tries, whatever the number of routes. Where templates overlap (a literal
//! and a parameter at the same depth) the search may follow both, but it visits no node twice
//! and skips branches that cannot beat the best match already found.
//!
//! Precedence, deterministic: the most specific host bucket that has a route for the path *and*
//! method wins (exact host, then wildcards longest suffix first, then any host). Within a
//! bucket: exact path, then templates (more literal segments first, then literals earlier in
//! the path), then prefixes (longest first). Between routes with the same path pattern, one that
//! lists the method beats one that allows any method, then the smaller name, then the smaller
//! index.
//!
//! Versions share structure: maps are [`CowMap`]s and trie children sit behind `Arc`s, so a
//! clone of the table is cheap and [`RouteTable::insert`] / [`RouteTable::remove`] on it copy
//! only the nodes on the route's path and the map shards they touch. A one-route config change
//! costs microseconds whatever the number of routes, and a table changed that way answers every
//! lookup exactly as one built from scratch (the proptests hold both to a linear reference).
//! The price is one pointer more per trie level on lookups.
//!
//! What it must not do: allocate or build strings on the lookup path (host lowercasing uses a
//! stack buffer, parameters a small inline vector), scan routes linearly, or interpret the path:
//! it matches the normalized path (`portcullis_shared::path::normalize`) byte for byte, and the
//! caller strips the port from the host.

use std::borrow::Borrow;
use std::fmt;
use std::ops::BitOr;
use std::sync::Arc;

use portcullis_shared::model::{PathMatch, Route, Segment};
use portcullis_shared::path::MAX_PATH_LEN;
use smallvec::{SmallVec, smallvec};

use crate::cow::CowMap;

/// Children, exact paths and host buckets by name, shared between versions (see
/// [`CowMap`]: foldhash, since the keys come from the configuration, never from requests).
/// `N`: the longest name kept inline (see [`Name`]).
type Map<V, const N: usize = 22> = CowMap<Name<N>, V>;

/// A map key: inline up to `N` bytes, so that the probe that finds it compares it in the same
/// cache line instead of following a pointer (on a large table, that pointer is a cache miss
/// on every level of the walk). Compared and hashed as bytes, so lookups use `&[u8]`.
#[derive(Debug, Clone)]
enum Name<const N: usize> {
    Inline { len: u8, bytes: [u8; N] },
    Heap(Box<[u8]>),
}

impl<const N: usize> Name<N> {
    fn new(s: &str) -> Self {
        let mut bytes = [0; N];
        match (bytes.get_mut(..s.len()), u8::try_from(s.len())) {
            (Some(dst), Ok(len)) => {
                dst.copy_from_slice(s.as_bytes());
                Name::Inline { len, bytes }
            }
            _ => Name::Heap(s.as_bytes().into()),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Name::Inline { len, bytes } => bytes.get(..usize::from(*len)).unwrap_or_default(),
            Name::Heap(b) => b,
        }
    }
}

impl<const N: usize> Borrow<[u8]> for Name<N> {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// The longest DNS name; a longer host cannot equal a configured one.
const MAX_HOST_LEN: usize = 253;

/// The methods a route can name (the validated set), in `Allow` header order.
const METHOD_NAMES: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"];

/// A set of HTTP methods, as a bitset over the methods routes can name.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct MethodSet(u16);

impl MethodSet {
    pub const EMPTY: MethodSet = MethodSet(0);
    pub const ALL: MethodSet = MethodSet((1 << METHOD_NAMES.len()) - 1);

    /// The set holding one method; `None` for a method no route can name (`PROPFIND`, `get`:
    /// methods are case-sensitive). Such a request only matches routes that allow any method.
    pub fn of(method: &str) -> Option<MethodSet> {
        let bit = match method {
            "GET" => 0,
            "HEAD" => 1,
            "POST" => 2,
            "PUT" => 3,
            "DELETE" => 4,
            "PATCH" => 5,
            "OPTIONS" => 6,
            "CONNECT" => 7,
            "TRACE" => 8,
            _ => return None,
        };
        Some(MethodSet(1 << bit))
    }

    pub fn contains(self, other: MethodSet) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The method names in the set, in a stable order.
    pub fn iter(self) -> impl Iterator<Item = &'static str> {
        METHOD_NAMES.into_iter().enumerate().filter(move |(i, _)| self.0 & (1 << i) != 0).map(|(_, m)| m)
    }
}

impl BitOr for MethodSet {
    type Output = MethodSet;

    fn bitor(self, rhs: MethodSet) -> MethodSet {
        MethodSet(self.0 | rhs.0)
    }
}

/// `GET, HEAD, POST`: the value of an `Allow` header.
impl fmt::Display for MethodSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, m) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(m)?;
        }
        Ok(())
    }
}

impl fmt::Debug for MethodSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MethodSet({self})")
    }
}

/// Template parameters of a match: (name from the route, value from the path). Inline up to
/// four, so a lookup does not allocate for ordinary templates.
pub type Params<'t, 'p> = SmallVec<[(&'t str, &'p str); 4]>;

/// The route a request matched.
#[derive(Debug, PartialEq, Eq)]
pub struct RouteMatch<'t, 'p> {
    /// Index of the route in the order given to [`RouteTable::build`].
    pub route: usize,
    /// Template parameters in path order; empty for exact and prefix routes.
    pub params: Params<'t, 'p>,
}

impl<'p> RouteMatch<'_, 'p> {
    pub fn param(&self, name: &str) -> Option<&'p str> {
        self.params.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
}

/// The outcome of a lookup.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'t, 'p> {
    Found(RouteMatch<'t, 'p>),
    /// Some route matches the host and path, but none allows the method: a 405 whose `Allow`
    /// header lists `allowed` (the union over every route matching host and path).
    MethodNotAllowed {
        allowed: MethodSet,
    },
    NotFound,
}

/// One route ending on a trie node or an exact path.
#[derive(Debug, Clone)]
struct Entry {
    route: u32,
    /// `None`: any method.
    methods: Option<MethodSet>,
    /// Template parameters: name and segment position, in position order. Shared, so that
    /// copying a node or a shard for the next version copies no strings.
    params: Arc<[(Box<str>, u16)]>,
    /// The route's name: ties between routes with the same path pattern go by name, so the
    /// winner does not depend on the indexes routes happen to get (see [`RouteTable::insert`]).
    name: Arc<str>,
}

impl Entry {
    fn allows(&self, method: Option<MethodSet>) -> bool {
        match (self.methods, method) {
            (None, _) => true,
            (Some(set), Some(m)) => set.contains(m),
            (Some(_), None) => false,
        }
    }

    /// Order within one list: routes naming methods before any-method routes (they are more
    /// specific), then by name, then by index.
    fn rank(&self) -> (bool, &str, u32) {
        (self.methods.is_none(), &self.name, self.route)
    }
}

/// The routes sharing one path pattern: almost always one, kept inline.
type Entries = SmallVec<[Entry; 1]>;

/// Adds an entry to a list, keeping the list in [`Entry::rank`] order.
fn add(list: &mut Entries, entry: Entry) {
    let at = list.partition_point(|e| e.rank() < entry.rank());
    list.insert(at, entry);
}

/// Takes the entry of route `route` out of a list; false if it is not there.
fn take(list: &mut Entries, route: u32) -> bool {
    match list.iter().position(|e| e.route == route) {
        Some(at) => {
            list.remove(at);
            true
        }
        None => false,
    }
}

/// The first (best ranked) entry of a list that allows the method.
fn pick(list: &[Entry], method: Option<MethodSet>) -> Option<&Entry> {
    list.iter().find(|e| e.allows(method))
}

/// The routes of one host bucket.
#[derive(Debug, Default, Clone)]
struct Bucket {
    /// Exact routes by their whole path: one probe finds them, and they need no trie nodes,
    /// which keeps the trie (walked for every other lookup) small and cache-friendly.
    exact: Map<Entries, 46>,
    /// Prefix and template routes.
    root: Node,
}

impl Bucket {
    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.root.is_empty()
    }
}

/// A trie node, kept to one cache line: what only some nodes carry is behind a pointer.
/// Children are shared between versions: a change copies the nodes on its path only.
#[derive(Debug, Default, Clone)]
struct Node {
    literals: Map<Arc<Node>>,
    /// Matches any one non-empty segment; parameter names live in the template entries, so
    /// `/users/{id}` and `/users/{uid}` share this child.
    param: Option<Arc<Node>>,
    ends: Option<Box<Ends>>,
    /// At least the most literal segments below this node of any template ending on it or
    /// under it; `None` when none does. Lets the template search skip branches that cannot
    /// win. Removing a route leaves it as it was while templates remain below (an upper bound
    /// only costs search time, never a wrong match).
    template_literals: Option<u16>,
    /// Templates ending on this node or under it (when it drops to 0, `template_literals`
    /// goes back to `None`).
    templates_below: u32,
    /// Prefix routes ending strictly below this node, along literal edges.
    prefix_below: u32,
}

/// Routes ending on a node.
#[derive(Debug, Default, Clone)]
struct Ends {
    prefix: Entries,
    template: Entries,
}

impl Node {
    /// The literal child for `segment`, created if needed, copied first if shared.
    fn child(&mut self, segment: &str) -> &mut Node {
        Arc::make_mut(self.literals.get_or_insert_with(segment.as_bytes(), || Name::new(segment), Arc::default))
    }

    fn param_child(&mut self) -> &mut Node {
        Arc::make_mut(self.param.get_or_insert_with(Arc::default))
    }

    fn ends(&mut self) -> &mut Ends {
        self.ends.get_or_insert_with(Box::default)
    }

    fn is_empty(&self) -> bool {
        self.ends.is_none() && self.literals.is_empty() && self.param.is_none()
    }
}

/// Splits the first segment off a path without its leading '/': `Some(rest)` when more
/// segments follow (possibly one empty segment: a trailing slash).
fn split_first(path: &str) -> (&str, Option<&str>) {
    // A plain byte loop: segments are short, and this beats the generic `str` searcher.
    match path.bytes().position(|b| b == b'/') {
        Some(at) => (path.get(..at).unwrap_or_default(), path.get(at + 1..)),
        None => (path, None),
    }
}

/// The routes of one configuration version, ready for lookups. Cloning it is cheap (its maps
/// and trie nodes are shared), and [`RouteTable::insert`] / [`RouteTable::remove`] on the
/// clone copy only what they touch: that is how a new version is made from the previous one.
#[derive(Clone)]
pub struct RouteTable {
    exact_hosts: Map<Arc<Bucket>>,
    /// Keyed by the suffix after `*.`: `example.com` for `*.example.com`.
    wildcard_hosts: Map<Arc<Bucket>>,
    /// The most labels of any wildcard suffix: longer suffixes of a host are not probed, so a
    /// host with a hundred labels costs no more hash lookups than the configuration needs.
    wildcard_max_labels: usize,
    any_host: Bucket,
    len: usize,
}

impl fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteTable")
            .field("routes", &self.len)
            .field("exact_hosts", &self.exact_hosts.len())
            .field("wildcard_hosts", &self.wildcard_hosts.len())
            .finish_non_exhaustive()
    }
}

impl Default for RouteTable {
    fn default() -> Self {
        RouteTable::new()
    }
}

/// Where one of a route's hosts puts it.
enum HostKey {
    Any,
    Exact(String),
    /// The suffix after `*.`.
    Wildcard(String),
}

fn host_keys(route: &Route) -> impl Iterator<Item = HostKey> + '_ {
    let any = route.hosts.is_empty().then_some(HostKey::Any);
    any.into_iter().chain(route.hosts.iter().map(|host| {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        match host.strip_prefix("*.") {
            Some(suffix) => HostKey::Wildcard(suffix.to_owned()),
            None => HostKey::Exact(host),
        }
    }))
}

/// What the table keeps of a route, or `None` for one it leaves out: a path longer than
/// [`MAX_PATH_LEN`] (no normalized path can match it, and leaving it out bounds the trie's
/// depth), or an index beyond `u32` (not a configuration anyone can push).
fn entry_for(index: usize, route: &Route) -> Option<(u32, Option<MethodSet>)> {
    let path_len = match &route.path {
        PathMatch::Exact(p) | PathMatch::Prefix(p) => p.len(),
        PathMatch::Template { raw, .. } => raw.len(),
    };
    let index = u32::try_from(index).ok()?;
    if path_len > MAX_PATH_LEN {
        return None;
    }
    let methods = (!route.methods.is_empty())
        .then(|| route.methods.iter().filter_map(|m| MethodSet::of(m)).fold(MethodSet::EMPTY, BitOr::bitor));
    Some((index, methods))
}

impl RouteTable {
    pub fn new() -> RouteTable {
        RouteTable {
            exact_hosts: Map::default(),
            wildcard_hosts: Map::default(),
            wildcard_max_labels: 0,
            any_host: Bucket::default(),
            len: 0,
        }
    }

    /// Compiles validated routes; a route's index is its position in `routes`. A route whose
    /// path is longer than [`MAX_PATH_LEN`] is left out: no normalized path can match it, and
    /// leaving it out bounds the trie's depth.
    pub fn build<'a>(routes: impl IntoIterator<Item = &'a Route>) -> RouteTable {
        let mut table = RouteTable::new();
        for (index, route) in routes.into_iter().enumerate() {
            table.insert(index, route);
        }
        table
    }

    /// Adds `route` as index `index`, which no route in the table may have. Costs the route's
    /// hosts times its path segments, whatever the size of the table. A table made by inserts
    /// and removals in any order answers every lookup as one built from its routes at once:
    /// between routes with the same path pattern (which validation rejects anyway), names and
    /// then indexes decide, not the order of changes.
    pub fn insert(&mut self, index: usize, route: &Route) {
        self.len += 1;
        let Some((index, methods)) = entry_for(index, route) else {
            return;
        };
        let name: Arc<str> = route.name.as_str().into();
        for key in host_keys(route) {
            let bucket = match &key {
                HostKey::Any => &mut self.any_host,
                HostKey::Exact(host) => Arc::make_mut(self.exact_hosts.get_or_insert_with(
                    host.as_bytes(),
                    || Name::new(host),
                    Arc::default,
                )),
                HostKey::Wildcard(suffix) => {
                    self.wildcard_max_labels = self.wildcard_max_labels.max(suffix.split('.').count());
                    Arc::make_mut(self.wildcard_hosts.get_or_insert_with(
                        suffix.as_bytes(),
                        || Name::new(suffix),
                        Arc::default,
                    ))
                }
            };
            insert(bucket, index, methods, &name, &route.path);
        }
    }

    /// Takes out the route inserted as index `index`; `route` must be the one inserted (its
    /// hosts and path say where it is). Costs what its insert cost.
    pub fn remove(&mut self, index: usize, route: &Route) {
        self.len = self.len.saturating_sub(1);
        let Some((index, _)) = entry_for(index, route) else {
            return;
        };
        let mut wildcards_gone = false;
        for key in host_keys(route) {
            let (map, host) = match &key {
                HostKey::Any => {
                    remove(&mut self.any_host, index, &route.path);
                    continue;
                }
                HostKey::Exact(host) => (&mut self.exact_hosts, host),
                HostKey::Wildcard(suffix) => (&mut self.wildcard_hosts, suffix),
            };
            let Some(bucket) = map.get_mut(host.as_bytes()) else {
                continue;
            };
            let bucket = Arc::make_mut(bucket);
            remove(bucket, index, &route.path);
            if bucket.is_empty() {
                map.remove(host.as_bytes());
                wildcards_gone |= matches!(key, HostKey::Wildcard(_));
            }
        }
        if wildcards_gone {
            self.wildcard_max_labels = self
                .wildcard_hosts
                .iter()
                .map(|(suffix, _)| suffix.as_bytes().iter().filter(|b| **b == b'.').count() + 1)
                .max()
                .unwrap_or(0);
        }
    }

    /// Number of routes in the table (inserted and not removed, including those left out for
    /// an oversized path).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Finds the route for a request. `host` comes without its port (the caller strips it);
    /// case and one trailing dot are ignored, and an IPv6 literal may keep its brackets.
    /// `path` is the normalized path: it is matched byte for byte.
    pub fn lookup<'p>(&self, host: &str, method: &str, path: &'p str) -> Lookup<'_, 'p> {
        let Some(rest) = path.strip_prefix('/') else {
            return Lookup::NotFound;
        };
        let method = MethodSet::of(method);
        let mut buf = [0; MAX_HOST_LEN];
        let host = lowercase_host(host, &mut buf);
        let found = self.in_buckets(host, |bucket| find(bucket, path, method));
        if let Some(entry) = found {
            let route = usize::try_from(entry.route).unwrap_or(usize::MAX);
            return Lookup::Found(RouteMatch { route, params: params(entry, rest) });
        }
        // Rare (a 404 or 405): now look at every route matching host and path, whatever its
        // method, to tell the two apart and fill the `Allow` header.
        let mut matched = Matched { any: false, allowed: MethodSet::EMPTY };
        self.in_buckets(host, |bucket| {
            collect(bucket, path, &mut matched);
            None::<()>
        });
        if matched.any { Lookup::MethodNotAllowed { allowed: matched.allowed } } else { Lookup::NotFound }
    }

    /// Calls `f` on the host buckets for a (lowercased) host, most specific first, until it
    /// returns something.
    fn in_buckets<'t, R>(&'t self, host: Option<&str>, mut f: impl FnMut(&'t Bucket) -> Option<R>) -> Option<R> {
        let host = host.unwrap_or("").as_bytes();
        if let Some(r) = self.exact_hosts.get(host).and_then(|b| f(b)) {
            return Some(r);
        }
        if self.wildcard_max_labels > 0 {
            // `*.example.com` needs at least one label before the suffix, so the host itself
            // is never a candidate; suffixes come longest first as the dots are met left to
            // right, and those with more labels than any wildcard are not probed.
            let mut labels = host.iter().filter(|b| **b == b'.').count();
            for (at, _) in host.iter().enumerate().filter(|(_, b)| **b == b'.') {
                if labels <= self.wildcard_max_labels
                    && let Some(r) = host.get(at + 1..).and_then(|s| self.wildcard_hosts.get(s)).and_then(|b| f(b))
                {
                    return Some(r);
                }
                labels -= 1;
            }
        }
        f(&self.any_host)
    }
}

/// Lowercases a host into `buf` when needed, and drops one trailing dot and IPv6 brackets.
/// `None` when the host is too long to equal any configured host.
fn lowercase_host<'b>(host: &'b str, buf: &'b mut [u8; MAX_HOST_LEN]) -> Option<&'b str> {
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let host = host.strip_suffix('.').unwrap_or(host);
    if !host.bytes().any(|b| b.is_ascii_uppercase()) {
        return Some(host);
    }
    let dst = buf.get_mut(..host.len())?;
    dst.copy_from_slice(host.as_bytes());
    dst.make_ascii_lowercase();
    std::str::from_utf8(dst).ok()
}

/// One step down the trie for a prefix or template route.
enum Step<'r> {
    Literal(&'r str),
    Param,
}

/// The trie steps of a prefix or template path; `None` for an exact path.
fn steps(path: &PathMatch) -> Option<Vec<Step<'_>>> {
    match path {
        PathMatch::Exact(_) => None,
        // `/api/` and `/api` are the same prefix (see `PathMatch::identity`); `/` is the root.
        PathMatch::Prefix(p) => Some(p.trim_end_matches('/').split('/').skip(1).map(Step::Literal).collect()),
        PathMatch::Template { segments, .. } => Some(
            segments
                .iter()
                .map(|s| match s {
                    Segment::Literal(l) => Step::Literal(l),
                    Segment::Param(_) => Step::Param,
                })
                .collect(),
        ),
    }
}

/// Depth is bounded by MAX_PATH_LEN (checked by the caller), so counts of segments fit in u16.
fn count(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn insert(bucket: &mut Bucket, route: u32, methods: Option<MethodSet>, name: &Arc<str>, path: &PathMatch) {
    let entry = |params: Vec<(Box<str>, u16)>| Entry { route, methods, params: params.into(), name: Arc::clone(name) };
    match path {
        PathMatch::Exact(p) => {
            add(bucket.exact.get_or_insert_with(p.as_bytes(), || Name::new(p), Entries::new), entry(Vec::new()))
        }
        PathMatch::Prefix(_) => {
            let mut node = &mut bucket.root;
            for step in steps(path).into_iter().flatten() {
                if let Step::Literal(segment) = step {
                    node.prefix_below += 1;
                    node = node.child(segment);
                }
            }
            add(&mut node.ends().prefix, entry(Vec::new()));
        }
        PathMatch::Template { segments, .. } => {
            let mut literals_left = count(segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count());
            let mut params = Vec::new();
            let mut node = &mut bucket.root;
            for (i, segment) in segments.iter().enumerate() {
                node.template_literals = node.template_literals.max(Some(literals_left));
                node.templates_below += 1;
                node = match segment {
                    Segment::Literal(l) => {
                        literals_left = literals_left.saturating_sub(1);
                        node.child(l)
                    }
                    Segment::Param(name) => {
                        params.push((name.as_str().into(), count(i)));
                        node.param_child()
                    }
                };
            }
            node.template_literals = node.template_literals.max(Some(0));
            node.templates_below += 1;
            add(&mut node.ends().template, entry(params));
        }
    }
}

/// Undoes [`insert`] for the entry of `route` at `path`, and drops the nodes left empty.
/// Iterative, like the walk: one pass down to fix the counts and take the entry, one pass
/// (reading only) to find the chain of nodes left empty, one pass down to cut it off.
fn remove(bucket: &mut Bucket, route: u32, path: &PathMatch) {
    let Some(steps) = steps(path) else {
        if let PathMatch::Exact(p) = path
            && let Some(list) = bucket.exact.get_mut(p.as_bytes())
            && take(list, route)
            && list.is_empty()
        {
            bucket.exact.remove(p.as_bytes());
        }
        return;
    };
    let template = matches!(path, PathMatch::Template { .. });
    // Only fix the counts if the entry is there (it always is when callers keep the contract).
    if !found(&bucket.root, &steps, template, route) {
        return;
    }
    let mut node = &mut bucket.root;
    for step in &steps {
        if template {
            node.templates_below = node.templates_below.saturating_sub(1);
            if node.templates_below == 0 {
                node.template_literals = None;
            }
        } else {
            node.prefix_below = node.prefix_below.saturating_sub(1);
        }
        let next = match step {
            Step::Literal(l) => node.literals.get_mut(l.as_bytes()),
            Step::Param => node.param.as_mut(),
        };
        let Some(next) = next else {
            return;
        };
        node = Arc::make_mut(next);
    }
    if template {
        node.templates_below = node.templates_below.saturating_sub(1);
        if node.templates_below == 0 {
            node.template_literals = None;
        }
    }
    if let Some(ends) = node.ends.as_deref_mut() {
        take(if template { &mut ends.template } else { &mut ends.prefix }, route);
        if ends.prefix.is_empty() && ends.template.is_empty() {
            node.ends = None;
        }
    }
    // The shallowest depth from which every node down the path is left empty once its child
    // on the path goes: cut the edge into it.
    let mut cut = None;
    let mut chain: Vec<&Node> = Vec::with_capacity(steps.len() + 1);
    let mut at = Some(&bucket.root);
    for step in &steps {
        let Some(n) = at else { break };
        chain.push(n);
        at = match step {
            Step::Literal(l) => n.literals.get(l.as_bytes()).map(Arc::as_ref),
            Step::Param => n.param.as_deref(),
        };
    }
    if let Some(last) = at
        && last.is_empty()
        && !steps.is_empty()
    {
        cut = Some(steps.len());
        for depth in (1..steps.len()).rev() {
            let Some(n) = chain.get(depth) else { break };
            let only_child = n.ends.is_none()
                && match steps.get(depth) {
                    Some(Step::Literal(_)) => n.literals.len() == 1 && n.param.is_none(),
                    _ => n.literals.is_empty(),
                };
            if !only_child {
                break;
            }
            cut = Some(depth);
        }
    }
    let Some(cut) = cut else {
        return;
    };
    let mut node = &mut bucket.root;
    for step in steps.iter().take(cut - 1) {
        let next = match step {
            Step::Literal(l) => node.literals.get_mut(l.as_bytes()),
            Step::Param => node.param.as_mut(),
        };
        let Some(next) = next else {
            return;
        };
        node = Arc::make_mut(next);
    }
    match steps.get(cut - 1) {
        Some(Step::Literal(l)) => {
            node.literals.remove(l.as_bytes());
        }
        Some(Step::Param) => node.param = None,
        None => {}
    }
}

/// Whether the entry of `route` ends where `steps` lead.
fn found(root: &Node, steps: &[Step<'_>], template: bool, route: u32) -> bool {
    let mut node = Some(root);
    for step in steps {
        node = node.and_then(|n| match step {
            Step::Literal(l) => n.literals.get(l.as_bytes()).map(Arc::as_ref),
            Step::Param => n.param.as_deref(),
        });
    }
    node.and_then(|n| n.ends.as_deref())
        .is_some_and(|e| if template { &e.template } else { &e.prefix }.iter().any(|e| e.route == route))
}

/// A trie node reached by [`walk`].
struct Visit<'t> {
    node: &'t Node,
    /// Literal segments matched on the way here.
    literals: u16,
    /// The whole path is consumed: routes ending on this node match it.
    at_end: bool,
    /// Reached by literal edges only, so prefix routes on this node apply.
    literal_only: bool,
}

/// Where [`walk`] goes after a visit.
enum Next {
    /// Nothing below this node can matter.
    Prune,
    /// Only the literal edge (towards longer prefixes).
    Literal,
    /// The literal edge, then the parameter edge.
    All,
}

/// Depth-first walk of the trie along `path` (without its leading '/'), the literal edge
/// before the parameter edge, so literal-only nodes come first, shallowest first, and template
/// matches come in order of their earliest literals. Iterative with an inline stack: a long
/// path neither recurses nor, in the common case, allocates.
fn walk<'t>(root: &'t Node, path: &str, mut visit: impl FnMut(Visit<'t>) -> Next) {
    /// A node still to visit, with the path left after reaching it.
    struct Frame<'t, 'p> {
        node: &'t Node,
        rest: Option<&'p str>,
        literals: u16,
        literal_only: bool,
    }
    let mut stack: SmallVec<[Frame<'t, '_>; 16]> =
        smallvec![Frame { node: root, rest: Some(path), literals: 0, literal_only: true }];
    while let Some(Frame { node, rest, literals, literal_only }) = stack.pop() {
        let follow_param = match visit(Visit { node, literals, at_end: rest.is_none(), literal_only }) {
            Next::Prune => continue,
            Next::Literal => false,
            Next::All => true,
        };
        let Some(rest) = rest else {
            continue;
        };
        let (segment, tail) = split_first(rest);
        // Pushed in reverse order of visit: the literal child (and all below it) goes first.
        if follow_param
            && !segment.is_empty()
            && let Some(child) = &node.param
        {
            stack.push(Frame { node: child.as_ref(), rest: tail, literals, literal_only: false });
        }
        if let Some(child) = node.literals.get(segment.as_bytes()) {
            stack.push(Frame { node: child.as_ref(), rest: tail, literals: literals.saturating_add(1), literal_only });
        }
    }
}

/// Where to go below a node: towards templates that can still win, towards longer prefixes.
fn next(templates: bool, v: &Visit<'_>) -> Next {
    match (templates, v.literal_only && v.node.prefix_below > 0) {
        (true, _) => Next::All,
        (false, true) => Next::Literal,
        (false, false) => Next::Prune,
    }
}

/// The best route in one bucket for the path and method.
fn find<'t>(bucket: &'t Bucket, path: &str, method: Option<MethodSet>) -> Option<&'t Entry> {
    if let Some(e) = bucket.exact.get(path.as_bytes()).and_then(|list| pick(list, method)) {
        return Some(e);
    }
    let mut prefix = None;
    // (literal segments, entry): a later template match wins only with strictly more literals,
    // since the walk meets templates with earlier literals first.
    let mut template: Option<(u16, &Entry)> = None;
    walk(&bucket.root, &path[1..], |v| {
        let ends = v.node.ends.as_deref();
        // Literal-only nodes come shallowest first: the last prefix seen is the longest.
        if v.literal_only
            && let Some(e) = ends.and_then(|ends| pick(&ends.prefix, method))
        {
            prefix = Some(e);
        }
        let best = template.map_or(0, |(n, _)| n + 1);
        // Enter a branch only if some template below can have more literals than the best.
        let templates = v.node.template_literals.is_some_and(|below| v.literals + below >= best);
        if templates
            && v.at_end
            && v.literals >= best
            && let Some(e) = ends.and_then(|ends| pick(&ends.template, method))
        {
            template = Some((v.literals, e));
        }
        next(templates, &v)
    });
    template.map(|(_, e)| e).or(prefix)
}

/// Every route of a bucket matching the path, whatever its method.
struct Matched {
    any: bool,
    allowed: MethodSet,
}

impl Matched {
    fn add(&mut self, list: &[Entry]) {
        for e in list {
            self.any = true;
            self.allowed = self.allowed | e.methods.unwrap_or(MethodSet::ALL);
        }
    }
}

fn collect(bucket: &Bucket, path: &str, matched: &mut Matched) {
    if let Some(list) = bucket.exact.get(path.as_bytes()) {
        matched.add(list);
    }
    walk(&bucket.root, &path[1..], |v| {
        if let Some(ends) = v.node.ends.as_deref() {
            if v.literal_only {
                matched.add(&ends.prefix);
            }
            if v.at_end {
                matched.add(&ends.template);
            }
        }
        next(v.node.template_literals.is_some(), &v)
    });
}

/// The parameter values of a template entry, read from the path at the entry's positions.
fn params<'t, 'p>(entry: &'t Entry, path: &'p str) -> Params<'t, 'p> {
    let mut out = Params::new();
    let mut wanted = entry.params.iter().peekable();
    for (i, segment) in path.split('/').enumerate() {
        let Some((name, at)) = wanted.peek() else {
            break;
        };
        if usize::from(*at) == i {
            out.push((&**name, segment));
            wanted.next();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use portcullis_shared::model::PathRewrite;
    use proptest::prelude::*;

    use super::*;

    /// A route from `"exact /x"`, `"prefix /api"` or `"template /users/{id}"`.
    fn route(hosts: &[&str], methods: &[&str], path: &str) -> Route {
        let (kind, p) = path.split_once(' ').unwrap();
        let path = match kind {
            "exact" => PathMatch::Exact(p.into()),
            "prefix" => PathMatch::Prefix(p.into()),
            "template" => PathMatch::Template { raw: p.into(), segments: template_segments(p) },
            _ => panic!("unknown path kind {kind}"),
        };
        Route {
            name: "r".into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            path,
            upstream: "u".into(),
            policy: "p".into(),
            rewrite_path: PathRewrite::None,
            set_headers: BTreeMap::new(),
            remove_headers: Vec::new(),
            max_body_bytes: None,
            timeout: None,
        }
    }

    fn template_segments(t: &str) -> Vec<Segment> {
        t[1..]
            .split('/')
            .map(|s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => Segment::Param(name.into()),
                None => Segment::Literal(s.into()),
            })
            .collect()
    }

    #[derive(Debug)]
    enum Want {
        Found(usize, &'static [(&'static str, &'static str)]),
        NotAllowed(&'static str),
        NotFound,
    }
    use Want::*;

    /// Builds a table from `routes` and checks each (host, method, path) lookup.
    #[track_caller]
    fn check(routes: &[Route], cases: &[(&str, &str, &str, Want)]) {
        let table = RouteTable::build(routes);
        assert_eq!(table.len(), routes.len());
        for (host, method, path, want) in cases {
            let got = table.lookup(host, method, path);
            let ok = match (&got, want) {
                (Lookup::Found(m), Found(route, params)) => m.route == *route && m.params.as_slice() == *params,
                (Lookup::MethodNotAllowed { allowed }, NotAllowed(a)) => allowed.to_string() == *a,
                (Lookup::NotFound, NotFound) => true,
                _ => false,
            };
            assert!(ok, "{method} {host} {path}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn path_kinds_and_boundaries() {
        let routes = [
            route(&[], &[], "exact /users"),
            route(&[], &[], "template /users/{id}"),
            route(&[], &[], "exact /users/me"),
            route(&[], &[], "prefix /api"),
            route(&[], &[], "prefix /api/v1/"),
            route(&[], &[], "template /users/{id}/orders/{order}"),
            route(&[], &[], "exact /"),
            route(&[], &[], "template /files/{name}/"),
            route(&[], &[], "prefix /static/css"),
            route(&[], &[], "exact /trailing/"),
        ];
        check(
            &routes,
            &[
                ("h", "GET", "/users", Found(0, &[])),
                ("h", "GET", "/users/42", Found(1, &[("id", "42")])),
                ("h", "GET", "/users/me", Found(2, &[])),
                // A parameter is one non-empty segment: a trailing slash is an empty segment.
                ("h", "GET", "/users/", NotFound),
                ("h", "GET", "/users/42/", NotFound),
                ("h", "GET", "/users/42/orders/7", Found(5, &[("id", "42"), ("order", "7")])),
                ("h", "GET", "/users/42/orders/", NotFound),
                ("h", "GET", "/users/42/orders/7/x", NotFound),
                // Prefixes match on segment boundaries, the longest first.
                ("h", "GET", "/api", Found(3, &[])),
                ("h", "GET", "/api/", Found(3, &[])),
                ("h", "GET", "/api/x/y", Found(3, &[])),
                ("h", "GET", "/apix", NotFound),
                ("h", "GET", "/api/v1", Found(4, &[])),
                ("h", "GET", "/api/v1/", Found(4, &[])),
                ("h", "GET", "/api/v1/x", Found(4, &[])),
                ("h", "GET", "/api/v1x", Found(3, &[])),
                ("h", "GET", "/api/v2/x", Found(3, &[])),
                ("h", "GET", "/static/css", Found(8, &[])),
                ("h", "GET", "/static/css/a.css", Found(8, &[])),
                ("h", "GET", "/static/cssx", NotFound),
                ("h", "GET", "/static", NotFound),
                ("h", "GET", "/", Found(6, &[])),
                ("h", "GET", "/other", NotFound),
                // Exact paths are exact: a trailing slash is part of them.
                ("h", "GET", "/trailing/", Found(9, &[])),
                ("h", "GET", "/trailing", NotFound),
                ("h", "GET", "/users/me/", NotFound),
                ("h", "GET", "/files/a/", Found(7, &[("name", "a")])),
                ("h", "GET", "/files/a", NotFound),
                ("h", "GET", "/files//", NotFound),
                // Case-sensitive, byte for byte.
                ("h", "GET", "/Users", NotFound),
                // Not a path: the caller normalized it first, so this is a bug or an attack.
                ("h", "GET", "users", NotFound),
                ("h", "GET", "", NotFound),
            ],
        );
    }

    #[test]
    fn prefix_root_matches_everything() {
        let routes = [route(&[], &[], "prefix /"), route(&[], &[], "prefix /a/")];
        check(
            &routes,
            &[
                ("h", "GET", "/", Found(0, &[])),
                ("h", "GET", "/x/y", Found(0, &[])),
                ("h", "GET", "/a", Found(1, &[])),
                ("h", "GET", "/ab", Found(0, &[])),
            ],
        );
    }

    #[test]
    fn template_specificity() {
        let routes = [
            route(&[], &[], "template /{a}/{b}/{c}"),
            route(&[], &[], "template /x/{b}/{c}"),
            route(&[], &[], "template /{a}/y/{c}"),
            route(&[], &[], "template /{a}/y/z"),
            route(&[], &[], "template /x/{b}/z"),
            route(&[], &[], "prefix /x"),
            route(&[], &["GET"], "template /p/{id}"),
            route(&[], &["POST"], "template /p/{uid}"),
            route(&[], &[], "exact /x/y/exact"),
            route(&[], &[], "template /x/y/{c}"),
            route(&[], &[], "template /{a}/{b}/{c}/{d}/{e}"),
        ];
        check(
            &routes,
            &[
                // Two literals each (/x/y/{c}, /x/{b}/z, /{a}/y/z): the earliest literals win.
                ("h", "GET", "/x/y/z", Found(9, &[("c", "z")])),
                ("h", "GET", "/q/y/z", Found(3, &[("a", "q")])),
                // More literals beat earlier literals: /x/y/{c} (2) over /x/{b}/{c} (1).
                ("h", "GET", "/x/y/q", Found(9, &[("c", "q")])),
                ("h", "GET", "/x/q/q", Found(1, &[("b", "q"), ("c", "q")])),
                ("h", "GET", "/q/y/q", Found(2, &[("a", "q"), ("c", "q")])),
                ("h", "GET", "/q/q/q", Found(0, &[("a", "q"), ("b", "q"), ("c", "q")])),
                ("h", "GET", "/x/q/z", Found(4, &[("b", "q")])),
                ("h", "GET", "/x/y/exact", Found(8, &[])),
                // A template beats a prefix, whatever their lengths.
                ("h", "GET", "/x/y", Found(5, &[])),
                ("h", "GET", "/x", Found(5, &[])),
                ("h", "GET", "/q/q", NotFound),
                // Routes with the same shape share a node but keep their own parameter names.
                ("h", "GET", "/p/1", Found(6, &[("id", "1")])),
                ("h", "POST", "/p/1", Found(7, &[("uid", "1")])),
                ("h", "PUT", "/p/1", NotAllowed("GET, POST")),
                // More than four parameters: still found (the match spills to the heap).
                ("h", "GET", "/1/2/3/4/5", Found(10, &[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"), ("e", "5")])),
            ],
        );
    }

    #[test]
    fn a_later_branch_with_more_literals_wins() {
        // Depth first meets /a/{p}/{q} first; /{p}/b/c must still be searched and win.
        let routes = [route(&[], &[], "template /a/{p}/{q}"), route(&[], &[], "template /{p}/b/c")];
        check(
            &routes,
            &[
                ("h", "GET", "/a/b/c", Found(1, &[("p", "a")])),
                ("h", "GET", "/a/b/d", Found(0, &[("p", "b"), ("q", "d")])),
            ],
        );
    }

    #[test]
    fn hosts() {
        let routes = [
            route(&["api.example.com"], &[], "exact /x"),
            route(&["*.example.com"], &[], "exact /x"),
            route(&["*.b.example.com"], &[], "exact /x"),
            route(&[], &[], "exact /x"),
            route(&["api.example.com"], &[], "prefix /only-api"),
            route(&[], &[], "prefix /y"),
            route(&["*.example.com"], &[], "prefix /w"),
            route(&[], &[], "exact /w/z"),
            route(&["::1", "10.0.0.1"], &[], "exact /ip"),
            route(&["other.org", "*.example.com"], &[], "exact /multi"),
        ];
        let long = format!("{}.com", "a".repeat(300));
        let long_upper = format!("{}.COM", "A".repeat(300));
        let many_labels = format!("{}example.com", "a.".repeat(120));
        check(
            &routes,
            &[
                ("api.example.com", "GET", "/x", Found(0, &[])),
                ("API.Example.COM", "GET", "/x", Found(0, &[])),
                ("api.example.com.", "GET", "/x", Found(0, &[])),
                ("a.example.com", "GET", "/x", Found(1, &[])),
                ("b.example.com", "GET", "/x", Found(1, &[])),
                ("a.b.example.com", "GET", "/x", Found(2, &[])),
                ("x.a.b.example.com", "GET", "/x", Found(2, &[])),
                ("A.B.EXAMPLE.COM.", "GET", "/x", Found(2, &[])),
                // A wildcard needs at least one label in place of '*'.
                ("example.com", "GET", "/x", Found(3, &[])),
                ("badexample.com", "GET", "/x", Found(3, &[])),
                ("other.com", "GET", "/x", Found(3, &[])),
                ("", "GET", "/x", Found(3, &[])),
                ("api.example.com", "GET", "/only-api/1", Found(4, &[])),
                ("a.example.com", "GET", "/only-api/1", NotFound),
                // No route for the path in the more specific buckets: fall through to any host.
                ("api.example.com", "GET", "/y/1", Found(5, &[])),
                // The host bucket decides first: a wildcard prefix beats an any-host exact path.
                ("a.example.com", "GET", "/w/z", Found(6, &[])),
                ("other.com", "GET", "/w/z", Found(7, &[])),
                ("[::1]", "GET", "/ip", Found(8, &[])),
                ("::1", "GET", "/ip", Found(8, &[])),
                ("10.0.0.1", "GET", "/ip", Found(8, &[])),
                ("10.0.0.2", "GET", "/ip", NotFound),
                ("other.org", "GET", "/multi", Found(9, &[])),
                ("z.example.com", "GET", "/multi", Found(9, &[])),
                ("other.com", "GET", "/multi", NotFound),
                (&long, "GET", "/x", Found(3, &[])),
                (&long_upper, "GET", "/x", Found(3, &[])),
                (&many_labels, "GET", "/x", Found(1, &[])),
                ("a.example.com:8080", "GET", "/x", Found(3, &[])),
            ],
        );
    }

    #[test]
    fn methods() {
        let routes = [
            route(&[], &["GET", "HEAD"], "exact /m"),
            route(&[], &["POST"], "exact /m"),
            route(&[], &[], "template /m2/{x}"),
            route(&[], &["DELETE"], "template /m2/{x}"),
            route(&[], &["GET"], "prefix /p"),
            route(&[], &["POST"], "exact /p/q"),
            route(&["h.com"], &["GET"], "exact /h"),
            route(&[], &["POST"], "exact /h"),
            route(&[], &[], "exact /any"),
        ];
        check(
            &routes,
            &[
                ("h", "GET", "/m", Found(0, &[])),
                ("h", "HEAD", "/m", Found(0, &[])),
                ("h", "POST", "/m", Found(1, &[])),
                ("h", "PUT", "/m", NotAllowed("GET, HEAD, POST")),
                // Methods are case-sensitive, and unknown ones only match any-method routes.
                ("h", "get", "/m", NotAllowed("GET, HEAD, POST")),
                ("h", "PROPFIND", "/m", NotAllowed("GET, HEAD, POST")),
                ("h", "PROPFIND", "/any", Found(8, &[])),
                // Same pattern: the route naming the method beats the any-method one.
                ("h", "DELETE", "/m2/1", Found(3, &[("x", "1")])),
                ("h", "GET", "/m2/1", Found(2, &[("x", "1")])),
                // A more specific path that refuses the method yields to a less specific one.
                ("h", "POST", "/p/q", Found(5, &[])),
                ("h", "GET", "/p/q", Found(4, &[])),
                ("h", "PUT", "/p/q", NotAllowed("GET, POST")),
                ("h", "PUT", "/p", NotAllowed("GET")),
                // ... and so does a more specific host.
                ("h.com", "GET", "/h", Found(6, &[])),
                ("h.com", "POST", "/h", Found(7, &[])),
                ("h.com", "PUT", "/h", NotAllowed("GET, POST")),
                ("other", "GET", "/h", NotAllowed("POST")),
                ("h", "GET", "/nothing", NotFound),
            ],
        );
    }

    #[test]
    fn ties_go_to_the_earlier_route() {
        // Validation rejects these conflicts; the table must still be deterministic.
        let routes = [
            route(&[], &["GET"], "exact /t"),
            route(&[], &["GET"], "exact /t"),
            route(&[], &[], "prefix /t2"),
            route(&[], &[], "prefix /t2/"),
            route(&[], &[], "template /t3/{a}"),
            route(&[], &[], "template /t3/{b}"),
            route(&[], &[], "exact /t4"),
            route(&[], &["GET"], "exact /t4"),
        ];
        check(
            &routes,
            &[
                ("h", "GET", "/t", Found(0, &[])),
                ("h", "GET", "/t2/x", Found(2, &[])),
                ("h", "GET", "/t3/1", Found(4, &[("a", "1")])),
                ("h", "GET", "/t4", Found(7, &[])),
                ("h", "POST", "/t4", Found(6, &[])),
            ],
        );
    }

    #[test]
    fn empty_table_and_oversized_routes() {
        check(&[], &[("h", "GET", "/", NotFound)]);
        let long = format!("exact /{}", "a".repeat(MAX_PATH_LEN));
        let routes = [route(&[], &[], &long), route(&[], &[], "prefix /")];
        check(&routes, &[("h", "GET", &long[6..], Found(1, &[]))]);
        assert!(RouteTable::build(&[]).is_empty());
    }

    #[test]
    fn a_node_fits_a_cache_line() {
        // The walk touches one node per segment: keep it to one line (see `Node`).
        assert!(std::mem::size_of::<Node>() <= 64, "{}", std::mem::size_of::<Node>());
    }

    #[test]
    fn method_set() {
        let set = MethodSet::of("POST").unwrap() | MethodSet::of("GET").unwrap();
        assert_eq!(set.to_string(), "GET, POST");
        assert_eq!(MethodSet::ALL.iter().count(), 9);
        assert_eq!(MethodSet::EMPTY.to_string(), "");
        assert!(set.contains(MethodSet::of("GET").unwrap()));
        assert!(!set.contains(MethodSet::of("PUT").unwrap()));
        assert_eq!(MethodSet::of("get"), None);
    }

    #[test]
    fn deep_paths_do_not_recurse() {
        // A long template chain and a long request path: the walk is iterative.
        let deep = format!("template {}", "/{p}/x".repeat(1000));
        let deep = deep.replace("{p}", "{p0}");
        let mut routes = vec![route(&[], &[], "prefix /")];
        let mut t = route(&[], &[], "exact /");
        t.path = PathMatch::Template {
            raw: deep.clone(),
            segments: (0..2000)
                .map(|i| if i % 2 == 0 { Segment::Param(format!("p{i}")) } else { Segment::Literal("x".into()) })
                .collect(),
        };
        routes.push(t);
        let table = RouteTable::build(&routes);
        let path = "/v/x".repeat(1000);
        match table.lookup("h", "GET", &path) {
            Lookup::Found(m) => assert_eq!((m.route, m.params.len()), (1, 1000)),
            other => panic!("{other:?}"),
        }
        let long = "/x".repeat(4000);
        assert!(matches!(table.lookup("h", "GET", &long), Lookup::Found(RouteMatch { route: 0, .. })));
    }

    // ------------------------------------------------------------ reference model

    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        Found(usize, Vec<(String, String)>),
        NotAllowed(Vec<String>),
        NotFound,
    }

    fn outcome(l: Lookup<'_, '_>) -> Outcome {
        match l {
            Lookup::Found(m) => {
                Outcome::Found(m.route, m.params.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect())
            }
            Lookup::MethodNotAllowed { allowed } => Outcome::NotAllowed(allowed.iter().map(String::from).collect()),
            Lookup::NotFound => Outcome::NotFound,
        }
    }

    /// How well a route's hosts match: exact > wildcard (longer suffix first) > any.
    fn host_rank(route: &Route, host: &str) -> Option<(u8, usize)> {
        if route.hosts.is_empty() {
            return Some((0, 0));
        }
        route
            .hosts
            .iter()
            .filter_map(|h| match h.strip_prefix("*.") {
                Some(suffix) => host.ends_with(&format!(".{suffix}")).then_some((1, suffix.len())),
                None => (h == host).then_some((2, 0)),
            })
            .max()
    }

    /// (kind: exact 3, template 2, prefix 1; literal count or prefix length; literal pattern).
    type PathRank = (u8, usize, Vec<bool>);

    /// How well a route's path matches: exact > template (literal count, then literal
    /// positions, earlier first) > prefix (longer first). Also the template parameters.
    fn path_rank(route: &Route, path: &str) -> Option<(PathRank, Vec<(String, String)>)> {
        match &route.path {
            PathMatch::Exact(p) => (p == path).then(|| ((3, 0, vec![]), vec![])),
            PathMatch::Prefix(p) => {
                let p = p.trim_end_matches('/');
                (path == p || path.starts_with(&format!("{p}/"))).then(|| ((1, p.len(), vec![]), vec![]))
            }
            PathMatch::Template { segments, .. } => {
                let parts: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
                if parts.len() != segments.len() {
                    return None;
                }
                let mut params = vec![];
                let mut pattern = vec![];
                for (seg, part) in segments.iter().zip(&parts) {
                    match seg {
                        Segment::Literal(l) if l == part => pattern.push(true),
                        Segment::Param(n) if !part.is_empty() => {
                            pattern.push(false);
                            params.push((n.clone(), part.to_string()));
                        }
                        _ => return None,
                    }
                }
                let literals = pattern.iter().filter(|l| **l).count();
                Some(((2, literals, pattern), params))
            }
        }
    }

    /// A naive linear matcher: ranks every route and takes the best.
    fn reference(routes: &[Route], host: &str, method: &str, path: &str) -> Outcome {
        let indexed: Vec<(usize, &Route)> = routes.iter().enumerate().collect();
        reference_at(&indexed, host, method, path)
    }

    /// [`reference`] over routes with the given indexes; ties go by name, then index.
    fn reference_at(routes: &[(usize, &Route)], host: &str, method: &str, path: &str) -> Outcome {
        let host = host.to_lowercase();
        let host = host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.');
        let mut best = None;
        let mut allowed: Vec<&str> = vec![];
        let mut any_path = false;
        for &(i, r) in routes {
            let (Some(h), Some((p, params))) = (host_rank(r, host), path_rank(r, path)) else {
                continue;
            };
            any_path = true;
            allowed.extend(r.methods.iter().map(String::as_str));
            if !r.methods.is_empty() && !r.methods.iter().any(|m| m == method) {
                continue;
            }
            let key = (h, p, !r.methods.is_empty(), std::cmp::Reverse(r.name.as_str()), std::cmp::Reverse(i));
            if best.as_ref().is_none_or(|(k, _)| key > *k) {
                best = Some((key, (i, params)));
            }
        }
        match best {
            Some((_, (i, params))) => Outcome::Found(i, params),
            None if any_path => {
                let order = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"];
                Outcome::NotAllowed(order.iter().filter(|m| allowed.contains(m)).map(|m| m.to_string()).collect())
            }
            None => Outcome::NotFound,
        }
    }

    fn arb_route() -> impl Strategy<Value = Route> {
        let hosts = prop::sample::subsequence(vec!["a.com", "*.a.com", "b.a.com", "*.b.a.com", "x.com", "::1"], 0..=2);
        let methods = prop::sample::subsequence(vec!["GET", "POST", "PUT"], 0..=2);
        // Small alphabets, so that routes overlap and requests hit them often.
        let segment = prop_oneof![Just("a"), Just("b"), Just("{}"), Just("{}")];
        let path = (0..3u8, prop::collection::vec(segment, 0..=3), any::<bool>()).prop_map(|(kind, segs, slash)| {
            let mut n = 0;
            let segs: Vec<String> = segs
                .iter()
                .map(|s| match (*s, kind) {
                    ("{}", 2) => {
                        n += 1;
                        format!("{{p{n}}}")
                    }
                    ("{}", _) => "d".to_string(),
                    (s, _) => s.to_string(),
                })
                .collect();
            let mut p = format!("/{}", segs.join("/"));
            if slash && !segs.is_empty() {
                p.push('/');
            }
            let kind = ["exact", "prefix", "template"][usize::from(kind)];
            format!("{kind} {p}")
        });
        (hosts, methods, path).prop_map(|(h, m, p)| route(&h, &m, &p))
    }

    fn arb_request() -> impl Strategy<Value = (&'static str, &'static str, String)> {
        let host = prop::sample::select(vec![
            "a.com",
            "A.COM.",
            "b.a.com",
            "c.b.a.com",
            "d.c.b.a.com",
            "x.com",
            "y.com",
            "[::1]",
            "com",
        ]);
        let method = prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "FOO"]);
        let segment = prop::sample::select(vec!["a", "a", "b", "b", "c", "d", ""]);
        let path = prop::collection::vec(segment, 0..=4).prop_map(|s| format!("/{}", s.join("/")));
        (host, method, path)
    }

    /// A request aimed at one of the routes (its host, method and a path it matches), so that
    /// overlapping routes actually compete; `keep_method: false` tries a random method instead.
    fn aimed_request(route: &Route, filler: &str, keep_method: bool, random: (&str, &str)) -> (String, String, String) {
        let host = route.hosts.first().map_or(random.0.to_string(), |h| h.replace('*', "z"));
        let method = match route.methods.first() {
            Some(m) if keep_method => m.clone(),
            _ => random.1.to_string(),
        };
        let path = match &route.path {
            PathMatch::Exact(p) => p.clone(),
            PathMatch::Prefix(p) => format!("{}/{filler}", p.trim_end_matches('/')),
            PathMatch::Template { segments, .. } => segments
                .iter()
                .map(|s| match s {
                    Segment::Literal(l) => format!("/{l}"),
                    Segment::Param(_) => format!("/{filler}"),
                })
                .collect(),
        };
        (host, method, path)
    }

    fn arb_case() -> impl Strategy<Value = (Vec<Route>, Vec<(String, String, String)>)> {
        prop::collection::vec(arb_route(), 1..10).prop_flat_map(|routes| {
            let n = routes.len();
            let request =
                (0..n, arb_request(), prop::sample::select(vec!["a", "b", "c"]), any::<bool>(), any::<bool>());
            let aimed = routes.clone();
            let requests = prop::collection::vec(request, 1..16).prop_map(move |reqs| {
                reqs.into_iter()
                    .map(|(i, (host, method, path), filler, aim, keep_method)| {
                        if aim {
                            aimed_request(&aimed[i], filler, keep_method, (host, method))
                        } else {
                            (host.to_string(), method.to_string(), path)
                        }
                    })
                    .collect::<Vec<_>>()
            });
            (Just(routes), requests)
        })
    }

    /// Routes named `r00`, `r01`, ... (so ties by name are ties by position), and a sequence of
    /// changes: `(route, index)` inserts the route (if it is not in) under the index (the
    /// lowest free one at or above it) or removes it (if it is in).
    type Changes = (Vec<Route>, Vec<(usize, usize)>, Vec<(String, String, String)>);

    fn arb_changes() -> impl Strategy<Value = Changes> {
        prop::collection::vec(arb_route(), 1..12).prop_flat_map(|mut routes| {
            for (i, r) in routes.iter_mut().enumerate() {
                r.name = format!("r{i:02}");
            }
            let n = routes.len();
            let changes = prop::collection::vec((0..n, 0..2 * n), 1..40);
            let request =
                (0..n, arb_request(), prop::sample::select(vec!["a", "b", "c"]), any::<bool>(), any::<bool>());
            let aimed = routes.clone();
            let requests = prop::collection::vec(request, 1..24).prop_map(move |reqs| {
                reqs.into_iter()
                    .map(|(i, (host, method, path), filler, aim, keep_method)| {
                        if aim {
                            aimed_request(&aimed[i], filler, keep_method, (host, method))
                        } else {
                            (host.to_string(), method.to_string(), path)
                        }
                    })
                    .collect::<Vec<_>>()
            });
            (Just(routes), changes, requests)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Inserts and removals in any order, on a table shared with older versions: every
        /// version answers like the linear reference over its routes, and like a table built
        /// from scratch; no change to a newer version shows in an older one.
        #[test]
        fn incremental_changes_agree_with_a_fresh_build((routes, changes, requests) in arb_changes()) {
            let mut table = RouteTable::new();
            // index -> route position, for the routes in the table
            let mut live: BTreeMap<usize, usize> = BTreeMap::new();
            let mut versions = vec![(table.clone(), live.clone())];
            for (route, index) in changes {
                if let Some((&at, _)) = live.iter().find(|(_, r)| **r == route) {
                    table.remove(at, &routes[route]);
                    live.remove(&at);
                } else {
                    let at = (index..).find(|i| !live.contains_key(i)).unwrap();
                    table.insert(at, &routes[route]);
                    live.insert(at, route);
                }
                versions.push((table.clone(), live.clone()));
            }
            for (table, live) in &versions {
                let indexed: Vec<(usize, &Route)> = live.iter().map(|(i, r)| (*i, &routes[*r])).collect();
                let mut fresh = RouteTable::new();
                for (i, r) in &indexed {
                    fresh.insert(*i, r);
                }
                prop_assert_eq!(table.len(), live.len());
                for (host, method, path) in &requests {
                    let got = outcome(table.lookup(host, method, path));
                    prop_assert_eq!(&got, &reference_at(&indexed, host, method, path), "{} {} {}", method, host, path);
                    prop_assert_eq!(&got, &outcome(fresh.lookup(host, method, path)), "{} {} {}", method, host, path);
                }
            }
            // Removing everything leaves nothing behind.
            let (mut table, live) = versions.pop().unwrap();
            for (i, r) in live {
                table.remove(i, &routes[r]);
            }
            prop_assert!(table.any_host.is_empty() && table.exact_hosts.is_empty() && table.wildcard_hosts.is_empty());
            prop_assert_eq!((table.any_host.root.templates_below, table.any_host.root.prefix_below), (0, 0));
            prop_assert_eq!(table.wildcard_max_labels, 0);
        }

        #[test]
        fn trie_agrees_with_linear_reference((routes, requests) in arb_case()) {
            let table = RouteTable::build(&routes);
            for (host, method, path) in &requests {
                let got = outcome(table.lookup(host, method, path));
                let want = reference(&routes, host, method, path);
                prop_assert_eq!(got, want, "{} {} {}", method, host, path);
            }
        }
    }
}
