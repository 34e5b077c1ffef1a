//! The route table: compiled once per configuration version from the validated routes, then
//! shared read-only by every request to find the route for a (host, method, path).
//!
//! Shape: host buckets — exact hosts in a hash map, wildcard hosts (`*.example.com`) in a hash
//! map keyed by their suffix and probed label by label, and one any-host bucket. A bucket has
//! its exact routes, found by one probe for the whole path, and a segment trie for prefix and
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
//! Layout, for the cache: every bucket's trie lives in one flat structure. Nodes sit in a pool
//! and are named by index; the literal edges of *all* nodes are one open-addressing index
//! ([`IndexTable`]) keyed by (parent, segment) whose 8-byte slots hold hash bits and the
//! child's index, and the exact paths of all buckets are another keyed by (bucket, path),
//! pointing into a pool of entry lists. An edge probe reads one slot line, then the child node
//! it verifies against (one line, aligned), which is the node the walk needs next anyway; a
//! node with a single child names it and is not probed at all. No per-node table, no pointer
//! per level: at 100k routes the indexes stay in cache and a lookup touches about half the
//! lines the per-node maps did. A lookup that finds nothing has seen, in the same walk, every
//! route matching host and path whatever the method, which tells a 405 from a 404 without a
//! second pass; template parameters are read from the path only when asked for.
//!
//! Versions share structure: the pools are chunks of 64 elements behind `Arc`s (a clone copies
//! one pointer per chunk, a change copies the chunks it touches) and the two indexes are flat
//! arrays of `u64`, copied with the version (about 27 µs at 10k routes, 180 µs at 100k, for a
//! clone plus a one-route insert and removal). [`RouteTable::insert`] /
//! [`RouteTable::remove`] on a clone touch only the route's own nodes. A table changed that way
//! answers every lookup exactly as one built from scratch (the proptests hold both to a linear
//! reference).
//!
//! What it must not do: allocate or build strings on the lookup path (host lowercasing uses a
//! stack buffer, parameters a small inline vector), scan routes linearly, or interpret the path:
//! it matches the normalized path (`portcullis_shared::path::normalize`) byte for byte, and the
//! caller strips the port from the host.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::ops::BitOr;
use std::sync::Arc;

use portcullis_shared::model::{PathMatch, Route, Segment};
use portcullis_shared::path::MAX_PATH_LEN;
use smallvec::{SmallVec, smallvec};

use crate::cow::CowMap;

/// Host buckets by name, shared between versions (see [`CowMap`]: foldhash, since the keys
/// come from the configuration, never from requests). `N`: the longest name kept inline.
type Map<V, const N: usize = 22> = CowMap<Name<N>, V>;

/// A map key: inline up to `N` bytes, so that the probe that finds it compares it in the same
/// cache line instead of following a pointer (on a large table, that pointer is a cache miss).
/// Compared and hashed as bytes, so lookups use `&[u8]`.
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
#[derive(Debug)]
pub struct RouteMatch<'t, 'p> {
    /// Index of the route in the order given to [`RouteTable::build`].
    pub route: usize,
    entry: &'t Entry,
    /// The path without its leading '/'.
    rest: &'p str,
}

impl<'t, 'p> RouteMatch<'t, 'p> {
    /// Template parameters in path order; empty for exact and prefix routes. Read from the
    /// path when asked for: a lookup whose caller only wants the route does not pay for them.
    pub fn params(&self) -> Params<'t, 'p> {
        params(self.entry, self.rest)
    }

    pub fn param(&self, name: &str) -> Option<&'p str> {
        self.params().iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
}

impl PartialEq for RouteMatch<'_, '_> {
    fn eq(&self, other: &Self) -> bool {
        self.route == other.route && self.params() == other.params()
    }
}

impl Eq for RouteMatch<'_, '_> {}

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
    /// copying a chunk of entry lists for the next version copies no strings.
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

/// No node, no entry list: the "null" index.
const NONE: u32 = u32::MAX;

/// The any-host bucket: always there, and always the last one a lookup tries.
const ANY_HOST: u32 = 0;

/// For the edge and exact-path indexes: keys come from the configuration; a request only picks
/// which slot a probe starts at, so it cannot make the runs it walks any longer.
const HASHER: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x726f_7574_6573_2121);

/// The hash of some bytes, before the index that keys them is mixed in (see [`keyed`]): a
/// lookup hashes its path once, whatever the number of buckets it probes.
#[inline]
fn bytes_hash(bytes: &[u8]) -> u64 {
    let mut h = HASHER.build_hasher();
    h.write(bytes);
    h.finish()
}

/// Mixes an index (a parent node, a bucket) into a bytes hash with a folded multiply, so that
/// the top 32 bits, which pick an [`IndexTable`] slot and are kept in it to tell keys apart,
/// depend on every bit of both.
#[inline]
fn keyed(hash: u64, index: u32) -> u64 {
    let p = u128::from(hash ^ u64::from(index)) * 0x9e37_79b9_7f4a_7c15;
    (p as u64) ^ ((p >> 64) as u64)
}

fn edge_hash(parent: u32, segment: &[u8]) -> u64 {
    keyed(bytes_hash(segment), parent)
}

/// A hash index from configuration keys to pool indexes: open addressing with linear probing
/// over one flat array of 8-byte slots, each the key hash's top 32 bits (which also pick the
/// slot to start from) and the value plus one (0 is an empty slot). A probe reads one cache
/// line, where a table with separate control bytes and slots reads two; a hit is verified by
/// the caller against the element the value names, which it reads next anyway. At most three
/// quarters full, so a probe ends; removal shifts back the entries after it (no tombstones).
/// Growing needs no rehash of the keys, only their slots. Cloning copies the array.
#[derive(Clone, Default)]
struct IndexTable {
    slots: Vec<u64>,
    len: usize,
}

impl IndexTable {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn home(slot: u64, mask: usize) -> usize {
        usize::try_from(slot >> 32).unwrap_or(0) & mask
    }

    /// The value under `hash` for which `eq` holds.
    #[inline]
    fn find(&self, hash: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        let mask = self.slots.len().checked_sub(1)?;
        let tag = hash >> 32;
        let mut i = IndexTable::home(hash, mask);
        loop {
            let slot = *self.slots.get(i)?;
            if slot == 0 {
                return None;
            }
            if slot >> 32 == tag {
                let value = (slot as u32).wrapping_sub(1);
                if eq(value) {
                    return Some(value);
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// Adds `value` under `hash`; the caller has checked that it is not there.
    fn insert(&mut self, hash: u64, value: u32) {
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            let size = (self.slots.len() * 2).max(16);
            for slot in std::mem::replace(&mut self.slots, vec![0; size]) {
                if slot != 0 {
                    self.place(slot);
                }
            }
        }
        self.place((hash >> 32 << 32) | (u64::from(value) + 1));
        self.len += 1;
    }

    fn place(&mut self, slot: u64) {
        let mask = self.slots.len() - 1;
        let mut i = IndexTable::home(slot, mask);
        while let Some(taken) = self.slots.get_mut(i) {
            if *taken == 0 {
                *taken = slot;
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// Takes `value` out from under `hash`; false if it is not there.
    fn remove(&mut self, hash: u64, value: u32) -> bool {
        let Some(mask) = self.slots.len().checked_sub(1) else {
            return false;
        };
        let wanted = (hash >> 32 << 32) | (u64::from(value) + 1);
        let mut hole = IndexTable::home(hash, mask);
        loop {
            match self.slots.get(hole) {
                Some(&slot) if slot == wanted => break,
                Some(&slot) if slot != 0 => hole = (hole + 1) & mask,
                _ => return false,
            }
        }
        // Shift back every entry of the run after the hole that may sit there: one whose home
        // is not between the hole and where it is.
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let slot = self.slots.get(j).copied().unwrap_or(0);
            if slot == 0 {
                break;
            }
            let home = IndexTable::home(slot, mask);
            if j.wrapping_sub(home) & mask >= j.wrapping_sub(hole) & mask {
                if let Some(h) = self.slots.get_mut(hole) {
                    *h = slot;
                }
                hole = j;
            }
        }
        if let Some(h) = self.slots.get_mut(hole) {
            *h = 0;
        }
        self.len -= 1;
        true
    }
}

/// Pool indexes are `u32`: a configuration with four billion nodes does not fit in memory.
fn id(index: usize) -> u32 {
    u32::try_from(index).unwrap_or(NONE)
}

/// Elements per chunk of a [`Pool`].
const POOL_CHUNK: usize = 64;

/// Elements named by index, with a free list so that indexes stay stable while others come
/// and go (the hash tables hold them). Freed elements are reset to their default. Stored in
/// fixed chunks shared between versions: reading one costs the chunk pointer (the pointers
/// are few enough to stay in cache) and the element, in the same allocation as the chunk's
/// reference counts; a change copies the chunk it touches, a clone one pointer per chunk.
#[derive(Clone, Default)]
struct Pool<T> {
    chunks: Vec<Arc<[T; POOL_CHUNK]>>,
    len: usize,
    free: Vec<u32>,
}

impl<T: Clone + Default> Pool<T> {
    #[inline]
    fn get(&self, at: u32) -> Option<&T> {
        let at = usize::try_from(at).ok()?;
        self.chunks.get(at / POOL_CHUNK)?.get(at % POOL_CHUNK)
    }

    fn get_mut(&mut self, at: u32) -> Option<&mut T> {
        let at = usize::try_from(at).ok()?;
        Arc::make_mut(self.chunks.get_mut(at / POOL_CHUNK)?).get_mut(at % POOL_CHUNK)
    }

    fn alloc(&mut self, value: T) -> u32 {
        let at = match self.free.pop() {
            Some(at) => at,
            None => {
                if self.len.is_multiple_of(POOL_CHUNK) {
                    self.chunks.push(Arc::new(std::array::from_fn(|_| T::default())));
                }
                self.len += 1;
                id(self.len - 1)
            }
        };
        if let Some(slot) = self.get_mut(at) {
            *slot = value;
        }
        at
    }

    fn release(&mut self, at: u32) {
        if let Some(slot) = self.get_mut(at) {
            *slot = T::default();
            self.free.push(at);
        }
    }

    /// Elements in use.
    fn live(&self) -> usize {
        self.len - self.free.len()
    }
}

/// The routes of one host bucket: where its trie starts, and counts that say what it holds.
#[derive(Debug, Default, Clone)]
struct Bucket {
    root: u32,
    /// Exact paths with routes in this bucket: none, and a lookup skips the exact probe.
    exact: u32,
    /// Route entries in the bucket; at zero, an exact-host or wildcard bucket goes.
    routes: u32,
}

/// A trie node, kept to one cache line and aligned on one: the walk reads every field of the
/// nodes it passes, and an unaligned node would straddle two lines three times in four.
#[derive(Debug, Clone)]
#[repr(align(64))]
struct Node {
    /// The literal segment on the edge into this node (empty for roots and parameter
    /// children): an edge probe verifies its hit against it and `parent`.
    segment: Name<22>,
    parent: u32,
    /// Matches any one non-empty segment; parameter names live in the template entries, so
    /// `/users/{id}` and `/users/{uid}` share this child.
    param: u32,
    /// Index of the routes ending here in [`RouteTable::ends`], or [`NONE`].
    ends: u32,
    /// Literal children (edges in [`RouteTable::edges`] from this node): none, and the walk
    /// does not probe.
    literals: u32,
    /// The literal child while there is exactly one and it came as the first (otherwise
    /// [`NONE`]): the walk then reads it directly instead of probing the edge table. Most
    /// nodes near the leaves have one child at most.
    only_child: u32,
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

impl Default for Node {
    fn default() -> Self {
        Node {
            segment: Name::new(""),
            parent: NONE,
            param: NONE,
            ends: NONE,
            literals: 0,
            only_child: NONE,
            template_literals: None,
            templates_below: 0,
            prefix_below: 0,
        }
    }
}

impl Node {
    fn is_empty(&self) -> bool {
        self.ends == NONE && self.literals == 0 && self.param == NONE
    }
}

/// Routes ending on a node.
#[derive(Debug, Default, Clone)]
struct Ends {
    prefix: Entries,
    template: Entries,
}

/// The routes of one bucket with one exact path. The path is inline when short (most are),
/// so the probe that verifies it reads no other line.
#[derive(Debug, Clone)]
struct Group {
    bucket: u32,
    path: Name<30>,
    entries: Entries,
}

impl Default for Group {
    fn default() -> Self {
        Group { bucket: NONE, path: Name::new(""), entries: Entries::new() }
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

/// The routes of one configuration version, ready for lookups. Cloning it is cheap (pools are
/// shared by chunk, the two indexes are flat arrays of `u64`), and [`RouteTable::insert`] /
/// [`RouteTable::remove`] on the clone copy only what they touch: that is how a new version is
/// made from the previous one.
#[derive(Clone)]
pub struct RouteTable {
    /// Bucket index by host.
    exact_hosts: Map<u32>,
    /// Bucket index by the suffix after `*.`: `example.com` for `*.example.com`.
    wildcard_hosts: Map<u32>,
    /// The most labels of any wildcard suffix: longer suffixes of a host are not probed, so a
    /// host with a hundred labels costs no more hash lookups than the configuration needs.
    wildcard_max_labels: usize,
    /// Index [`ANY_HOST`] is the any-host bucket.
    buckets: Pool<Bucket>,
    nodes: Pool<Node>,
    ends: Pool<Ends>,
    groups: Pool<Group>,
    /// Literal edges of every trie: the child's index, keyed by (parent index, segment).
    edges: IndexTable,
    /// Exact paths of every bucket: a [`Group`] index, keyed by (bucket index, path).
    exact: IndexTable,
    len: usize,
}

impl fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteTable")
            .field("routes", &self.len)
            .field("exact_hosts", &self.exact_hosts.len())
            .field("wildcard_hosts", &self.wildcard_hosts.len())
            .field("nodes", &self.nodes.live())
            .field("exact_paths", &self.exact.len())
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
        let mut table = RouteTable {
            exact_hosts: Map::default(),
            wildcard_hosts: Map::default(),
            wildcard_max_labels: 0,
            buckets: Pool::default(),
            nodes: Pool::default(),
            ends: Pool::default(),
            groups: Pool::default(),
            edges: IndexTable::default(),
            exact: IndexTable::default(),
            len: 0,
        };
        let any = table.new_bucket();
        debug_assert_eq!(any, ANY_HOST);
        table
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
                HostKey::Any => ANY_HOST,
                HostKey::Exact(host) => self.bucket_for(false, host),
                HostKey::Wildcard(suffix) => {
                    self.wildcard_max_labels = self.wildcard_max_labels.max(suffix.split('.').count());
                    self.bucket_for(true, suffix)
                }
            };
            self.insert_in(bucket, index, methods, &name, &route.path);
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
            let (wildcard, host) = match &key {
                HostKey::Any => {
                    self.remove_in(ANY_HOST, index, &route.path);
                    continue;
                }
                HostKey::Exact(host) => (false, host),
                HostKey::Wildcard(suffix) => (true, suffix),
            };
            let map = if wildcard { &self.wildcard_hosts } else { &self.exact_hosts };
            let Some(&bucket) = map.get(host.as_bytes()) else {
                continue;
            };
            if !self.remove_in(bucket, index, &route.path) {
                continue;
            }
            if let Some(root) = self.buckets.get(bucket).filter(|b| b.routes == 0).map(|b| b.root) {
                self.nodes.release(root);
                self.buckets.release(bucket);
                if wildcard { &mut self.wildcard_hosts } else { &mut self.exact_hosts }.remove(host.as_bytes());
                wildcards_gone |= wildcard;
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
        // What the walks meet that matches host and path but not the method: when no bucket
        // has a route for the method, that tells a 405 from a 404 and fills `Allow`.
        let mut matched = Matched { any: false, allowed: MethodSet::EMPTY };
        let path_hash = if self.exact.is_empty() { 0 } else { bytes_hash(path.as_bytes()) };
        let wanted = Wanted { path, rest, path_hash, method };
        let found = self.in_buckets(host, |at, bucket| self.find(at, bucket, &wanted, &mut matched));
        if let Some(entry) = found {
            let route = usize::try_from(entry.route).unwrap_or(usize::MAX);
            return Lookup::Found(RouteMatch { route, entry, rest });
        }
        if matched.any { Lookup::MethodNotAllowed { allowed: matched.allowed } } else { Lookup::NotFound }
    }

    /// Calls `f` on the host buckets for a (lowercased) host, most specific first, until it
    /// returns something.
    fn in_buckets<'t, R>(&'t self, host: Option<&str>, mut f: impl FnMut(u32, &'t Bucket) -> Option<R>) -> Option<R> {
        let host = host.unwrap_or("").as_bytes();
        let mut at = |bucket: u32| self.buckets.get(bucket).and_then(|b| f(bucket, b));
        if let Some(r) = self.exact_hosts.get(host).and_then(|&b| at(b)) {
            return Some(r);
        }
        if self.wildcard_max_labels > 0 {
            // `*.example.com` needs at least one label before the suffix, so the host itself
            // is never a candidate; suffixes come longest first as the dots are met left to
            // right, and those with more labels than any wildcard are not probed.
            let mut labels = host.iter().filter(|b| **b == b'.').count();
            for (dot, _) in host.iter().enumerate().filter(|(_, b)| **b == b'.') {
                if labels <= self.wildcard_max_labels
                    && let Some(r) = host.get(dot + 1..).and_then(|s| self.wildcard_hosts.get(s)).and_then(|&b| at(b))
                {
                    return Some(r);
                }
                labels -= 1;
            }
        }
        at(ANY_HOST)
    }

    /// The literal child for `segment` of node `parent` (at index `at`).
    #[inline]
    fn child(&self, at: u32, parent: &Node, segment: &[u8]) -> Option<(u32, &Node)> {
        if parent.only_child != NONE {
            let child = self.nodes.get(parent.only_child)?;
            return (child.segment.as_bytes() == segment).then_some((parent.only_child, child));
        }
        let h = edge_hash(at, segment);
        let found = self
            .edges
            .find(h, |c| self.nodes.get(c).is_some_and(|n| n.parent == at && n.segment.as_bytes() == segment));
        let child = found?;
        Some((child, self.nodes.get(child)?))
    }

    fn ends_of(&self, node: &Node) -> Option<&Ends> {
        if node.ends == NONE { None } else { self.ends.get(node.ends) }
    }

    /// The index of a bucket's group for an exact path; `path_hash` is [`bytes_hash`] of it.
    fn group_at(&self, bucket: u32, path: &str, path_hash: u64) -> Option<u32> {
        self.exact.find(keyed(path_hash, bucket), |g| {
            self.groups.get(g).is_some_and(|g| g.bucket == bucket && g.path.as_bytes() == path.as_bytes())
        })
    }

    /// Depth-first walk of a trie along `path` (without its leading '/'), the literal edge
    /// before the parameter edge, so literal-only nodes come first, shallowest first, and
    /// template matches come in order of their earliest literals. Iterative with an inline
    /// stack: a long path neither recurses nor, in the common case, allocates.
    fn walk<'t>(&'t self, root: u32, path: &str, mut visit: impl FnMut(Visit<'t>) -> Next) {
        /// A node still to visit, with the path left after reaching it.
        struct Frame<'t, 'p> {
            at: u32,
            node: &'t Node,
            rest: Option<&'p str>,
            literals: u16,
            literal_only: bool,
        }
        let Some(node) = self.nodes.get(root) else {
            return;
        };
        let mut stack: SmallVec<[Frame<'t, '_>; 16]> =
            smallvec![Frame { at: root, node, rest: Some(path), literals: 0, literal_only: true }];
        while let Some(Frame { at, node, rest, literals, literal_only }) = stack.pop() {
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
                && node.param != NONE
                && let Some(child) = self.nodes.get(node.param)
            {
                stack.push(Frame { at: node.param, node: child, rest: tail, literals, literal_only: false });
            }
            if node.literals > 0
                && let Some((child_at, child)) = self.child(at, node, segment.as_bytes())
            {
                let literals = literals.saturating_add(1);
                stack.push(Frame { at: child_at, node: child, rest: tail, literals, literal_only });
            }
        }
    }

    /// The best route in one bucket for the path and method. The lists it meets that match
    /// the path but have no route for the method go into `matched`: when it finds nothing,
    /// its walk has seen every route of the bucket matching the path (with no match found,
    /// it prunes only branches without templates or longer prefixes), so no second pass is
    /// needed for a 404 or a 405.
    fn find(&self, at: u32, bucket: &Bucket, wanted: &Wanted<'_>, matched: &mut Matched) -> Option<&Entry> {
        let method = wanted.method;
        if bucket.exact > 0
            && let Some(group) = self.group_at(at, wanted.path, wanted.path_hash).and_then(|g| self.groups.get(g))
        {
            match pick(&group.entries, method) {
                Some(e) => return Some(e),
                None => matched.add(&group.entries),
            }
        }
        let mut prefix = None;
        // (literal segments, entry): a later template match wins only with strictly more
        // literals, since the walk meets templates with earlier literals first.
        let mut template: Option<(u16, &Entry)> = None;
        self.walk(bucket.root, wanted.rest, |v| {
            let ends = self.ends_of(v.node);
            // Literal-only nodes come shallowest first: the last prefix seen is the longest.
            if v.literal_only
                && let Some(ends) = ends
            {
                match pick(&ends.prefix, method) {
                    Some(e) => prefix = Some(e),
                    None => matched.add(&ends.prefix),
                }
            }
            let best = template.map_or(0, |(n, _)| n + 1);
            // Enter a branch only if some template below can have more literals than the best.
            let templates = v.node.template_literals.is_some_and(|below| v.literals + below >= best);
            if templates
                && v.at_end
                && v.literals >= best
                && let Some(ends) = ends
            {
                match pick(&ends.template, method) {
                    Some(e) => template = Some((v.literals, e)),
                    None => matched.add(&ends.template),
                }
            }
            next(templates, &v)
        });
        template.map(|(_, e)| e).or(prefix)
    }

    fn new_bucket(&mut self) -> u32 {
        let root = self.nodes.alloc(Node::default());
        self.buckets.alloc(Bucket { root, exact: 0, routes: 0 })
    }

    /// The bucket of an exact host or a wildcard suffix, created if needed.
    fn bucket_for(&mut self, wildcard: bool, host: &str) -> u32 {
        let map = if wildcard { &self.wildcard_hosts } else { &self.exact_hosts };
        if let Some(&bucket) = map.get(host.as_bytes()) {
            return bucket;
        }
        let bucket = self.new_bucket();
        let map = if wildcard { &mut self.wildcard_hosts } else { &mut self.exact_hosts };
        *map.get_or_insert_with(host.as_bytes(), || Name::new(host), || bucket)
    }

    fn node_mut(&mut self, at: u32) -> Option<&mut Node> {
        self.nodes.get_mut(at)
    }

    /// The literal child of `parent` for `segment`, created if needed.
    fn child_or_insert(&mut self, parent: u32, segment: &str) -> u32 {
        let Some(node) = self.nodes.get(parent) else {
            return NONE;
        };
        if let Some((at, _)) = self.child(parent, node, segment.as_bytes()) {
            return at;
        }
        let at = self.nodes.alloc(Node { segment: Name::new(segment), parent, ..Node::default() });
        self.edges.insert(edge_hash(parent, segment.as_bytes()), at);
        if let Some(p) = self.node_mut(parent) {
            p.literals += 1;
            p.only_child = if p.literals == 1 { at } else { NONE };
        }
        at
    }

    fn param_child_or_insert(&mut self, parent: u32) -> u32 {
        match self.nodes.get(parent).map(|p| p.param) {
            Some(NONE) => {
                let at = self.nodes.alloc(Node { parent, ..Node::default() });
                if let Some(p) = self.node_mut(parent) {
                    p.param = at;
                }
                at
            }
            Some(at) => at,
            None => NONE,
        }
    }

    /// The routes ending on node `at`, created if needed.
    fn ends_mut(&mut self, at: u32) -> Option<&mut Ends> {
        let mut ends = self.nodes.get(at)?.ends;
        if ends == NONE {
            ends = self.ends.alloc(Ends::default());
            self.node_mut(at)?.ends = ends;
        }
        self.ends.get_mut(ends)
    }

    fn insert_in(&mut self, bucket: u32, route: u32, methods: Option<MethodSet>, name: &Arc<str>, path: &PathMatch) {
        let entry =
            |params: Vec<(Box<str>, u16)>| Entry { route, methods, params: params.into(), name: Arc::clone(name) };
        let Some(b) = self.buckets.get_mut(bucket) else {
            return;
        };
        b.routes += 1;
        let root = b.root;
        match path {
            PathMatch::Exact(p) => {
                let path_hash = bytes_hash(p.as_bytes());
                let group = match self.group_at(bucket, p, path_hash) {
                    Some(g) => g,
                    None => {
                        let g = self.groups.alloc(Group { bucket, path: Name::new(p), entries: Entries::new() });
                        self.exact.insert(keyed(path_hash, bucket), g);
                        if let Some(b) = self.buckets.get_mut(bucket) {
                            b.exact += 1;
                        }
                        g
                    }
                };
                if let Some(g) = self.groups.get_mut(group) {
                    add(&mut g.entries, entry(Vec::new()));
                }
            }
            PathMatch::Prefix(_) => {
                let mut node = root;
                for step in steps(path).into_iter().flatten() {
                    if let Step::Literal(segment) = step {
                        if let Some(n) = self.node_mut(node) {
                            n.prefix_below += 1;
                        }
                        node = self.child_or_insert(node, segment);
                    }
                }
                if let Some(ends) = self.ends_mut(node) {
                    add(&mut ends.prefix, entry(Vec::new()));
                }
            }
            PathMatch::Template { segments, .. } => {
                let mut literals_left = count(segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count());
                let mut params = Vec::new();
                let mut node = root;
                for (i, segment) in segments.iter().enumerate() {
                    if let Some(n) = self.node_mut(node) {
                        n.template_literals = n.template_literals.max(Some(literals_left));
                        n.templates_below += 1;
                    }
                    node = match segment {
                        Segment::Literal(l) => {
                            literals_left = literals_left.saturating_sub(1);
                            self.child_or_insert(node, l)
                        }
                        Segment::Param(name) => {
                            params.push((name.as_str().into(), count(i)));
                            self.param_child_or_insert(node)
                        }
                    };
                }
                if let Some(n) = self.node_mut(node) {
                    n.template_literals = n.template_literals.max(Some(0));
                    n.templates_below += 1;
                }
                if let Some(ends) = self.ends_mut(node) {
                    add(&mut ends.template, entry(params));
                }
            }
        }
    }

    /// Undoes [`RouteTable::insert_in`] for the entry of `route` at `path`, and drops the
    /// nodes left empty. False (and no change) when the entry is not there.
    fn remove_in(&mut self, bucket: u32, route: u32, path: &PathMatch) -> bool {
        let Some(root) = self.buckets.get(bucket).map(|b| b.root) else {
            return false;
        };
        let Some(steps) = steps(path) else {
            let PathMatch::Exact(p) = path else {
                return false;
            };
            let path_hash = bytes_hash(p.as_bytes());
            let Some(group) = self.group_at(bucket, p, path_hash) else {
                return false;
            };
            let Some(g) = self.groups.get_mut(group) else {
                return false;
            };
            if !take(&mut g.entries, route) {
                return false;
            }
            if g.entries.is_empty() {
                self.exact.remove(keyed(path_hash, bucket), group);
                self.groups.release(group);
                if let Some(b) = self.buckets.get_mut(bucket) {
                    b.exact -= 1;
                }
            }
            self.count_out(bucket);
            return true;
        };
        let template = matches!(path, PathMatch::Template { .. });
        // The nodes down the path, root first; only change anything if the entry is there
        // (it always is when callers keep the contract).
        let mut chain = Vec::with_capacity(steps.len() + 1);
        let mut at = root;
        for step in &steps {
            chain.push(at);
            let next = match step {
                Step::Literal(l) => self.nodes.get(at).and_then(|n| self.child(at, n, l.as_bytes())).map(|(c, _)| c),
                Step::Param => self.nodes.get(at).map(|n| n.param).filter(|&p| p != NONE),
            };
            let Some(next) = next else {
                return false;
            };
            at = next;
        }
        let end = at;
        let there = self
            .nodes
            .get(end)
            .and_then(|n| self.ends_of(n))
            .is_some_and(|e| if template { &e.template } else { &e.prefix }.iter().any(|e| e.route == route));
        if !there {
            return false;
        }
        if template {
            chain.push(end);
        }
        for &at in &chain {
            if let Some(n) = self.node_mut(at) {
                if template {
                    n.templates_below = n.templates_below.saturating_sub(1);
                    if n.templates_below == 0 {
                        n.template_literals = None;
                    }
                } else {
                    n.prefix_below = n.prefix_below.saturating_sub(1);
                }
            }
        }
        let ends = self.nodes.get(end).map_or(NONE, |n| n.ends);
        if let Some(e) = self.ends.get_mut(ends) {
            take(if template { &mut e.template } else { &mut e.prefix }, route);
            if e.prefix.is_empty() && e.template.is_empty() {
                self.ends.release(ends);
                if let Some(n) = self.node_mut(end) {
                    n.ends = NONE;
                }
            }
        }
        // Cut off the nodes left empty, deepest first; the root stays.
        let mut at = end;
        while at != root {
            let Some(node) = self.nodes.get(at).filter(|n| n.is_empty()) else {
                break;
            };
            let parent = node.parent;
            let h = edge_hash(parent, node.segment.as_bytes());
            if self.nodes.get(parent).is_some_and(|p| p.param == at) {
                if let Some(p) = self.node_mut(parent) {
                    p.param = NONE;
                }
            } else {
                self.edges.remove(h, at);
                if let Some(p) = self.node_mut(parent) {
                    p.literals = p.literals.saturating_sub(1);
                    // Down to one child, which is not known without a search: the table
                    // finds it.
                    p.only_child = NONE;
                }
            }
            self.nodes.release(at);
            at = parent;
        }
        self.count_out(bucket);
        true
    }

    /// One entry fewer in `bucket`.
    fn count_out(&mut self, bucket: u32) {
        if let Some(b) = self.buckets.get_mut(bucket) {
            b.routes = b.routes.saturating_sub(1);
        }
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

/// A trie node reached by [`RouteTable::walk`].
struct Visit<'t> {
    node: &'t Node,
    /// Literal segments matched on the way here.
    literals: u16,
    /// The whole path is consumed: routes ending on this node match it.
    at_end: bool,
    /// Reached by literal edges only, so prefix routes on this node apply.
    literal_only: bool,
}

/// Where [`RouteTable::walk`] goes after a visit.
enum Next {
    /// Nothing below this node can matter.
    Prune,
    /// Only the literal edge (towards longer prefixes).
    Literal,
    /// The literal edge, then the parameter edge.
    All,
}

/// Where to go below a node: towards templates that can still win, towards longer prefixes.
fn next(templates: bool, v: &Visit<'_>) -> Next {
    match (templates, v.literal_only && v.node.prefix_below > 0) {
        (true, _) => Next::All,
        (false, true) => Next::Literal,
        (false, false) => Next::Prune,
    }
}

/// What a lookup looks for, worked out once for all the buckets it tries.
struct Wanted<'p> {
    /// The normalized path, and the same without its leading '/' (what the trie walks).
    path: &'p str,
    rest: &'p str,
    /// [`bytes_hash`] of `path`, for the exact-path probes.
    path_hash: u64,
    method: Option<MethodSet>,
}

/// Every route matching host and path, whatever its method.
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

/// The parameter values of a template entry, read from the path at the entry's positions.
fn params<'t, 'p>(entry: &'t Entry, path: &'p str) -> Params<'t, 'p> {
    let mut out = Params::new();
    let mut rest = Some(path);
    let mut position = 0;
    for (name, at) in entry.params.iter() {
        // Positions come in order: skip the segments before this one.
        while let Some(r) = rest {
            let (segment, tail) = split_first(r);
            rest = tail;
            position += 1;
            if position - 1 == usize::from(*at) {
                out.push((&**name, segment));
                break;
            }
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
                (Lookup::Found(m), Found(route, params)) => m.route == *route && m.params().as_slice() == *params,
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
        // The walk reads one node per segment: keep it to one line (see `Node`).
        assert!(std::mem::size_of::<Node>() == 64, "{}", std::mem::size_of::<Node>());
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
            Lookup::Found(m) => assert_eq!((m.route, m.params().len()), (1, 1000)),
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
                Outcome::Found(m.route, m.params().iter().map(|(n, v)| (n.to_string(), v.to_string())).collect())
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
        /// The index against a model, with hashes drawn from few values so that runs, wraps
        /// around the end and removals in the middle of runs are the common case.
        #[test]
        fn index_table_agrees_with_a_map(ops in prop::collection::vec((any::<bool>(), 0u64..40, 0u32..6), 1..400)) {
            let mut table = IndexTable::default();
            let mut model: BTreeMap<(u64, u32), ()> = BTreeMap::new();
            for (add, h, v) in ops {
                // Top bits pick the slot: spread the few hashes over them, some colliding.
                let hash = (h % 13) << 60 | (h << 32);
                if add && !model.contains_key(&(hash, v)) {
                    table.insert(hash, v);
                    model.insert((hash, v), ());
                } else if !add {
                    prop_assert_eq!(table.remove(hash, v), model.remove(&(hash, v)).is_some());
                }
                prop_assert_eq!(table.len(), model.len());
                for h in 0..40u64 {
                    let hash = (h % 13) << 60 | (h << 32);
                    for v in 0..6 {
                        let found = table.find(hash, |x| x == v) == Some(v);
                        prop_assert_eq!(found, model.contains_key(&(hash, v)), "{:x} {}", hash, v);
                    }
                }
            }
        }
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
            prop_assert!(table.exact_hosts.is_empty() && table.wildcard_hosts.is_empty());
            prop_assert!(table.edges.is_empty() && table.exact.is_empty());
            // The any-host bucket and its root, nothing else.
            prop_assert_eq!((table.buckets.live(), table.nodes.live(), table.ends.live(), table.groups.live()), (1, 1, 0, 0));
            let root = table.nodes.get(table.buckets.get(ANY_HOST).unwrap().root).unwrap();
            prop_assert!(root.is_empty());
            prop_assert_eq!((root.templates_below, root.prefix_below, root.template_literals), (0, 0, None));
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
