//! The table of live allocations made through `Pool::allocate`.
//!
//! The manager must know every live allocation so `close` can free what an operator leaked and
//! say where it came from, and so `free` can refuse a pointer it did not hand out (or already
//! took back) without reading the memory behind it. The table is sharded by address (16 maps
//! with a cheap multiplicative hash) so threads allocating concurrently rarely meet on one lock;
//! each lock is a spin lock (`sync::SpinMutex`, unlocked by a plain store: one locked
//! instruction per allocate or free instead of the two of a mutex), held only for a map insert
//! or remove, never across a call to the listener or a spiller.

use std::alloc::Layout;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::sync::SpinMutex;

use crate::tree::PoolNode;

const SHARDS: usize = 16;

/// Outcome of [`AllocTable::take_unowned`].
pub(crate) enum Take {
    Taken(AllocMeta),
    Owned,
    Missing,
}

/// What the manager remembers of one allocation.
pub(crate) struct AllocMeta {
    pub(crate) layout: Layout,
    /// Owned by an [`Allocation`](crate::Allocation) value, which frees the memory on drop:
    /// `close` releases its accounting but must not free it, and `Pool::free` must refuse it.
    pub(crate) owned: bool,
    /// The pool charged. A plain pointer, not an `Arc`: cloning an `Arc` per allocation would add
    /// two contended RMWs to every allocate/free.
    node: NodePtr,
}

struct NodePtr(*const PoolNode);

// SAFETY: `PoolNode` is `Send + Sync` (atomics and a mutex); the pointer is only dereferenced as
// a shared reference (see `AllocMeta::node`).
unsafe impl Send for NodePtr {}

impl AllocMeta {
    pub(crate) fn new(layout: Layout, node: &Arc<PoolNode>, owned: bool) -> AllocMeta {
        AllocMeta {
            layout,
            owned,
            node: NodePtr(Arc::as_ptr(node)),
        }
    }

    /// The pool the allocation is charged to.
    pub(crate) fn node(&self) -> &PoolNode {
        // SAFETY: a pool node stays in its tree (`Budget::root` and each node's `children`) for
        // as long as the budget whose `AllocTable` holds this entry lives: the tree is taken
        // apart only at the end of `Budget::drop` (`PoolNode::dismantle`), after its close
        // drained the table. Every caller is a method of that budget (`free`, `free_owned`,
        // `close`), so the node outlives every use of the entry.
        unsafe { &*self.node.0 }
    }
}

/// Hasher for address keys: addresses are already well spread in their middle bits, so one
/// multiply is enough (SipHash would dominate the cost of small allocations).
#[derive(Default)]
pub(crate) struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type AddrMap = HashMap<usize, AllocMeta, BuildHasherDefault<AddrHasher>>;

pub(crate) struct AllocTable {
    shards: [SpinMutex<AddrMap>; SHARDS],
}

impl Default for AllocTable {
    fn default() -> Self {
        AllocTable {
            shards: std::array::from_fn(|_| SpinMutex::new(AddrMap::default())),
        }
    }
}

impl AllocTable {
    fn shard(&self, addr: usize) -> &SpinMutex<AddrMap> {
        // Drop the low bits (alignment) and mix so neighbouring blocks land on different shards.
        let h = ((addr >> 4) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60;
        &self.shards[h as usize % SHARDS]
    }

    pub(crate) fn insert(&self, addr: usize, meta: AllocMeta) {
        self.shard(addr).lock().insert(addr, meta);
    }

    pub(crate) fn remove(&self, addr: usize) -> Option<AllocMeta> {
        self.shard(addr).lock().remove(&addr)
    }

    /// Removes the entry at `addr` unless an [`Allocation`](crate::Allocation) owns it, deciding
    /// under one shard lock (so a concurrent drop of the owner always finds its entry).
    pub(crate) fn take_unowned(&self, addr: usize) -> Take {
        let mut shard = self.shard(addr).lock();
        match shard.get(&addr) {
            None => Take::Missing,
            Some(meta) if meta.owned => Take::Owned,
            Some(_) => shard.remove(&addr).map_or(Take::Missing, Take::Taken),
        }
    }

    /// Takes every entry out of the table.
    pub(crate) fn drain(&self) -> Vec<(usize, AllocMeta)> {
        let mut out = Vec::new();
        for shard in &self.shards {
            out.extend(std::mem::take(&mut *shard.lock()));
        }
        out
    }

    /// Bytes of live allocations per pool node (keyed by node address), for reports.
    pub(crate) fn bytes_by_pool(&self) -> HashMap<usize, u64> {
        let mut out = HashMap::new();
        for shard in &self.shards {
            for meta in shard.lock().values() {
                *out.entry(meta.node.0 as usize).or_insert(0) += meta.layout.size() as u64;
            }
        }
        out
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}
