//! Collections that successive config versions share: cloning one costs a copy of a small
//! table or of one pointer per shard (chunk), and a change then copies only the shard it
//! touches. This is what lets a one-route change build the next snapshot's route list, its
//! name index and the [`RouteTable`](crate::router::RouteTable)'s host maps (the table's own
//! pools are chunked the same way) from the previous ones in time proportional to the change,
//! not to the number of routes, while every version stays an
//! immutable value that requests read without locks.
//!
//! [`CowMap`]: a map of up to [`SPLIT_AT`] entries is one inline table (copied on clone: it is small); a
//! larger one is split into a power-of-two number of shards of about [`SHARD_TARGET`] entries,
//! each behind an `Arc` and copied on write (`Arc::make_mut`). The shard is picked from the
//! key's hash, computed once per lookup, so a lookup in a sharded map costs one pointer more
//! than in a plain one and no second hash.
//!
//! Keys are byte strings (`Borrow<[u8]>`), hashed with foldhash under a fixed seed: they come
//! from the configuration, never from requests, so flooding is not a concern.

use std::borrow::Borrow;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

/// An inline table grows up to this many entries before it is split into shards.
const SPLIT_AT: usize = 128;
/// Entries per shard after a split; a shard is split again (all shards doubled) when the
/// average reaches twice this. A change copies one shard, so this bounds its cost.
const SHARD_TARGET: usize = 64;

const HASHER: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x7063_756c_6c69_7321);

fn hash(key: &[u8]) -> u64 {
    HASHER.hash_one(key)
}

/// Middle bits: hashbrown takes its bucket index from the low bits and its tag from the top
/// seven, so shards picked from either would skew the tables inside them.
fn shard_of(hash: u64, shards: usize) -> usize {
    usize::try_from(hash >> 32).unwrap_or(0) & (shards - 1)
}

/// A hash map keyed by byte strings; see the module docs.
pub struct CowMap<K, V> {
    repr: Repr<K, V>,
}

type Table<K, V> = HashTable<(K, V)>;

#[derive(Clone)]
enum Repr<K, V> {
    One(Table<K, V>),
    Sharded { len: usize, shards: Box<[Arc<Table<K, V>>]> },
}

impl<K: Clone, V: Clone> Clone for CowMap<K, V> {
    fn clone(&self) -> Self {
        CowMap { repr: self.repr.clone() }
    }
}

impl<K, V> Default for Repr<K, V> {
    fn default() -> Self {
        Repr::One(HashTable::new())
    }
}

impl<K, V> Default for CowMap<K, V> {
    fn default() -> Self {
        CowMap { repr: Repr::One(HashTable::new()) }
    }
}

impl<K: Borrow<[u8]>, V> fmt::Debug for CowMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CowMap").field("len", &self.len()).finish_non_exhaustive()
    }
}

impl<K: Borrow<[u8]>, V> CowMap<K, V> {
    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::One(t) => t.len(),
            Repr::Sharded { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn table(&self, hash: u64) -> Option<&HashTable<(K, V)>> {
        match &self.repr {
            Repr::One(t) => Some(t),
            Repr::Sharded { shards, .. } => shards.get(shard_of(hash, shards.len())).map(Arc::as_ref),
        }
    }

    #[inline]
    pub fn get(&self, key: &[u8]) -> Option<&V> {
        self.find(hash(key), key)
    }

    #[inline]
    fn find(&self, hash: u64, key: &[u8]) -> Option<&V> {
        self.table(hash)?.find(hash, |(k, _)| k.borrow() == key).map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        let (one, shards) = match &self.repr {
            Repr::One(t) => (Some(t), &[][..]),
            Repr::Sharded { shards, .. } => (None, &shards[..]),
        };
        one.into_iter().chain(shards.iter().map(Arc::as_ref)).flat_map(|t| t.iter().map(|(k, v)| (k, v)))
    }
}

impl<K: Borrow<[u8]> + Clone, V: Clone> CowMap<K, V> {
    /// The table holding `hash`, copied first if another version shares it.
    fn table_mut(&mut self, hash: u64) -> &mut HashTable<(K, V)> {
        match &mut self.repr {
            Repr::One(t) => t,
            Repr::Sharded { shards, .. } => {
                // In range: a shard count is a power of two and `shard_of` masks by it.
                let at = shard_of(hash, shards.len());
                Arc::make_mut(&mut shards[at])
            }
        }
    }

    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        let h = hash(key);
        // Look before copying a shared shard for a key that is not there.
        self.find(h, key)?;
        self.table_mut(h).find_mut(h, |(k, _)| k.borrow() == key).map(|(_, v)| v)
    }

    /// The value under `key`, inserting `new_key()`, `value()` if there is none.
    pub fn get_or_insert_with(&mut self, key: &[u8], new_key: impl FnOnce() -> K, value: impl FnOnce() -> V) -> &mut V {
        let h = hash(key);
        if self.find(h, key).is_none() {
            self.grow_for(self.len() + 1);
            if let Repr::Sharded { len, .. } = &mut self.repr {
                *len += 1;
            }
        }
        let table = self.table_mut(h);
        let entry = match table.entry(h, |(k, _)| k.borrow() == key, |(k, _)| hash(k.borrow())) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => v.insert((new_key(), value())).into_mut(),
        };
        &mut entry.1
    }

    pub fn remove(&mut self, key: &[u8]) -> Option<V> {
        let h = hash(key);
        self.find(h, key)?;
        let table = self.table_mut(h);
        let (_, v) = table.find_entry(h, |(k, _)| k.borrow() == key).ok()?.remove().0;
        if let Repr::Sharded { len, .. } = &mut self.repr {
            *len -= 1;
        }
        Some(v)
    }

    /// Splits (or splits further) before the map reaches `len` entries, if it is due. Copies
    /// every entry, but only when the size doubles: amortized, a constant per insert.
    fn grow_for(&mut self, len: usize) {
        let shards = match &self.repr {
            Repr::One(_) if len > SPLIT_AT => (len / SHARD_TARGET).next_power_of_two(),
            Repr::Sharded { shards, .. } if len > shards.len() * SHARD_TARGET * 2 => shards.len() * 2,
            _ => return,
        };
        let len = self.len();
        let mut tables: Vec<HashTable<(K, V)>> =
            (0..shards).map(|_| HashTable::with_capacity(len / shards + len / shards / 4)).collect();
        let mut put = |entry: (K, V)| {
            let h = hash(entry.0.borrow());
            // In range: `shard_of` masks by the power-of-two count.
            tables[shard_of(h, shards)].insert_unique(h, entry, |(k, _)| hash(k.borrow()));
        };
        // Entries move when no other version shares their table, and are copied when one does.
        match std::mem::take(&mut self.repr) {
            Repr::One(t) => t.into_iter().for_each(&mut put),
            Repr::Sharded { shards, .. } => {
                for shard in shards {
                    match Arc::try_unwrap(shard) {
                        Ok(t) => t.into_iter().for_each(&mut put),
                        Err(shared) => shared.iter().cloned().for_each(&mut put),
                    }
                }
            }
        }
        self.repr = Repr::Sharded { len, shards: tables.into_iter().map(Arc::new).collect() };
    }
}

/// Elements per chunk of a [`CowVec`]: a change copies one chunk; a clone, one pointer per chunk.
const CHUNK: usize = 64;

/// A vector in shared chunks of [`CHUNK`] elements: `get` costs one pointer more than a slice,
/// and a `push`, `pop` or `swap_remove` copies at most two chunks.
pub struct CowVec<T> {
    chunks: Vec<Arc<Vec<T>>>,
    len: usize,
}

impl<T> Clone for CowVec<T> {
    fn clone(&self) -> Self {
        CowVec { chunks: self.chunks.clone(), len: self.len }
    }
}

impl<T> Default for CowVec<T> {
    fn default() -> Self {
        CowVec { chunks: Vec::new(), len: 0 }
    }
}

impl<T: fmt::Debug> fmt::Debug for CowVec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T> CowVec<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn get(&self, index: usize) -> Option<&T> {
        self.chunks.get(index / CHUNK)?.get(index % CHUNK)
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flat_map(|c| c.iter())
    }
}

impl<T: Clone> CowVec<T> {
    pub fn push(&mut self, value: T) {
        match self.chunks.last_mut() {
            Some(last) if last.len() < CHUNK => Arc::make_mut(last).push(value),
            _ => self.chunks.push(Arc::new(vec![value])),
        }
        self.len += 1;
    }

    pub fn pop(&mut self) -> Option<T> {
        let last = self.chunks.last_mut()?;
        let value = Arc::make_mut(last).pop();
        if last.is_empty() {
            self.chunks.pop();
        }
        if value.is_some() {
            self.len -= 1;
        }
        value
    }

    /// Replaces the element at `index`, returning the old one; `None` (and no change) when
    /// `index` is out of bounds.
    pub fn set(&mut self, index: usize, value: T) -> Option<T> {
        let chunk = self.chunks.get_mut(index / CHUNK)?;
        if index % CHUNK >= chunk.len() {
            return None;
        }
        let slot = Arc::make_mut(chunk).get_mut(index % CHUNK)?;
        Some(std::mem::replace(slot, value))
    }

    /// Removes the element at `index`, moving the last one into its place (as
    /// `Vec::swap_remove`); `None` when `index` is out of bounds.
    pub fn swap_remove(&mut self, index: usize) -> Option<T> {
        if index >= self.len {
            return None;
        }
        let last = self.pop()?;
        if index == self.len { Some(last) } else { self.set(index, last) }
    }
}

/// Panics when out of bounds, like a slice; the request path uses [`CowVec::get`].
impl<T> std::ops::Index<usize> for CowVec<T> {
    type Output = T;

    fn index(&self, index: usize) -> &T {
        &self.chunks[index / CHUNK][index % CHUNK]
    }
}

impl<T: Clone> FromIterator<T> for CowVec<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut v = CowVec::default();
        for x in iter {
            v.push(x);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    type Map = CowMap<Box<[u8]>, u32>;

    fn insert(m: &mut Map, k: &[u8], v: u32) {
        *m.get_or_insert_with(k, || k.into(), || 0) = v;
    }

    #[test]
    fn splits_and_versions_do_not_see_each_others_changes() {
        let mut m = Map::default();
        for i in 0..10_000u32 {
            insert(&mut m, format!("k{i}").as_bytes(), i);
        }
        assert!(matches!(m.repr, Repr::Sharded { .. }));
        assert_eq!(m.len(), 10_000);
        let old = m.clone();
        insert(&mut m, b"k5", 55);
        assert_eq!(m.remove(b"k6"), Some(6));
        assert_eq!(m.remove(b"k6"), None);
        assert_eq!((m.get(b"k5"), old.get(b"k5")), (Some(&55), Some(&5)));
        assert_eq!((m.get(b"k6"), old.get(b"k6")), (None, Some(&6)));
        assert_eq!((m.len(), old.len()), (9_999, 10_000));
        assert_eq!(m.iter().count(), 9_999);
        if let (Repr::Sharded { shards: a, .. }, Repr::Sharded { shards: b, .. }) = (&m.repr, &old.repr) {
            let shared = a.iter().zip(b.iter()).filter(|(x, y)| Arc::ptr_eq(x, y)).count();
            assert!(shared + 2 >= a.len(), "only the touched shards are copied: {shared} of {}", a.len());
        }
    }

    #[test]
    fn vec_behaves_like_a_vec_and_versions_are_independent() {
        let mut v: CowVec<u32> = (0..1000).collect();
        let mut want: Vec<u32> = (0..1000).collect();
        let old = v.clone();
        for i in [0, 5, 500, 63, 64, 900, 3] {
            assert_eq!(v.swap_remove(i), Some(want.swap_remove(i)));
        }
        assert_eq!(v.swap_remove(v.len()), None);
        v.push(7);
        want.push(7);
        assert_eq!(v.set(1, 11), Some(want[1]));
        want[1] = 11;
        assert_eq!(v.iter().copied().collect::<Vec<_>>(), want);
        assert_eq!((v.len(), v.get(want.len())), (want.len(), None));
        assert_eq!(old.iter().copied().collect::<Vec<_>>(), (0..1000).collect::<Vec<_>>());
        while v.pop().is_some() {}
        assert!(v.is_empty() && v.chunks.is_empty());
    }

    proptest! {
        #[test]
        fn behaves_like_a_map(ops in prop::collection::vec((0..400u32, any::<bool>()), 0..2000)) {
            let mut m = Map::default();
            let mut want = BTreeMap::new();
            let mut versions = Vec::new();
            for (i, (k, put)) in ops.into_iter().enumerate() {
                let key = k.to_be_bytes();
                if put {
                    insert(&mut m, &key, k);
                    want.insert(k, k);
                } else {
                    prop_assert_eq!(m.remove(&key), want.remove(&k));
                }
                if i % 97 == 0 {
                    versions.push((m.clone(), want.clone()));
                }
            }
            versions.push((m, want));
            for (m, want) in versions {
                prop_assert_eq!(m.len(), want.len());
                let got: BTreeMap<u32, u32> =
                    m.iter().map(|(k, v)| (u32::from_be_bytes(k[..].try_into().unwrap()), *v)).collect();
                prop_assert_eq!(&got, &want);
                for k in 0..400u32 {
                    prop_assert_eq!(m.get(&k.to_be_bytes()), want.get(&k));
                }
            }
        }
    }
}
