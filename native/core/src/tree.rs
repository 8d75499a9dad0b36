//! The pool tree's accounting: named nodes with optional limits, `used` and `peak` counters.
//!
//! Pure accounting, with no handle, listener or manager in sight: the public [`Pool`](crate::Pool)
//! handle and the cushion protocol (`budget`) are built on top of it.
//!
//! Charging a pool charges every ancestor up to the root (the task). Each level is one atomic
//! read-modify-write; a level with a limit uses a compare-and-swap loop so the limit can never be
//! exceeded, even transiently. If any level refuses, the levels already charged are rolled back
//! (Doris `try_consume`), so a failed charge leaves every counter as it was.
//!
//! # Peaks are high-water marks of what was *held*
//! `used` counts a charge from the moment its RMW lands, so it includes grows still in flight:
//! one that a level above will refuse (and roll back), or one the listener will refuse. A peak
//! read from `used` would show those refused grows (a child pool could even report a higher
//! peak than its root). So each node also counts `held`: the bytes of grows that completed
//! ([`PoolNode::confirm`]) and are not released yet, and its peak is the highest `held` ever
//! reached. A refused or rolled-back grow never touches `held`, and neither does a claim on the
//! root (bytes being handed back to the listener). Since a grow confirms every level of its
//! lineage with the same bytes and a release releases them from every level, a pool's peak
//! never exceeds its parent's.
//!
//! Orderings (see also the protocol in `budget`): below the root, `used` and `peak` are
//! statistics and the limit of their own node; no other memory is published through them and a
//! limit is a single-counter invariant that RMW atomicity alone keeps exact, so every access is
//! `Relaxed` (on aarch64 a plain `ldadd`/`cas`, no acquire/release barrier). The root's `used`
//! also takes part in the cross-counter protocol with the manager's `reserved`, so a charge of the
//! root acquires and an uncharge of the root is `SeqCst` (see [`PoolNode::uncharge`]).
//!
//! # Ownership: strong both ways, broken by the budget
//! A node holds its parent (`parent`, an `Arc`) and its children (`children`, `Arc`s): a
//! reference cycle, on purpose. The charge path walks `parent` on every grow and release, and a
//! strong link keeps that walk a plain pointer chase (a `Weak` would cost an upgrade, two
//! contended RMWs, per level). The cycle is broken by [`PoolNode::dismantle`], which
//! `Budget::drop` calls on the root: every holder of a node (a `Pool`, a `Reservation` through
//! its `ConsumerState`, an `Allocation`, a spiller entry, a block's header in the task heap)
//! also holds the `Arc<Budget>` of its tree or is owned by it, and only a holder of the budget can add a child
//! (`child` is reached only through `Pool`), so once the budget is gone no new child can appear
//! and every node left alive is held from outside and holds only its ancestors.

use crate::sync::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::sync::Mutex;

use crate::error::{MemoryError, Result};

/// One node of the pool tree (shared by all [`Pool`](crate::Pool) handles on it).
pub(crate) struct PoolNode {
    pub(crate) name: String,
    pub(crate) path: String,
    pub(crate) limit: Option<u64>,
    pub(crate) used: AtomicU64,
    /// `used` without grows in flight and without claims: what the pool holds (module docs).
    pub(crate) held: AtomicU64,
    /// The highest `held` reached.
    pub(crate) peak: AtomicU64,
    pub(crate) parent: Option<Arc<PoolNode>>,
    pub(crate) children: Mutex<Vec<Arc<PoolNode>>>,
    /// Quantum mode: what `Pool::allocate` charged to this pool beyond its live allocations
    /// (see `Budget::allocate`). Unused (zero) in exact mode.
    pub(crate) alloc: AllocSlack,
}

/// The allocations of one pool: bytes of live allocations (`size`, both modes) and, in quantum
/// mode, bytes charged to the pools for them (`charged`, `>= size` when no allocation is in
/// flight), with the protocol of a reservation's slack (edge 6 of `budget`). The counts and the
/// owned part are for close's leak report and the stats (the heap has no table to count).
/// On its own 128-byte line: pools allocating on several threads must not bounce the line of
/// `used`.
#[repr(align(128))]
#[derive(Default)]
pub(crate) struct AllocSlack {
    pub(crate) size: AtomicU64,
    pub(crate) charged: AtomicU64,
    /// Live blocks (raw and owned).
    pub(crate) count: AtomicU64,
    /// Bytes and number of the live blocks owned by an `Allocation` value (part of the above).
    pub(crate) owned: AtomicU64,
    pub(crate) owned_count: AtomicU64,
}

/// The node that refused a charge, with its usage at that moment.
pub(crate) struct Refusal {
    pub(crate) node: Arc<PoolNode>,
    pub(crate) used: u64,
}

impl PoolNode {
    pub(crate) fn new_root(limit: Option<u64>) -> Arc<PoolNode> {
        Arc::new(PoolNode {
            name: "root".to_string(),
            path: "root".to_string(),
            limit,
            used: AtomicU64::new(0),
            held: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            parent: None,
            children: Mutex::new(Vec::new()),
            alloc: AllocSlack::default(),
        })
    }

    /// True for the root (the task).
    pub(crate) fn is_root(&self) -> bool {
        self.parent.is_none()
    }

    /// Gets or creates the child `name`. An existing child keeps its limit; asking for a different
    /// one is an error.
    pub(crate) fn child(self: &Arc<Self>, name: &str, limit: Option<u64>) -> Result<Arc<PoolNode>> {
        if name.is_empty() || name.contains('/') || name.chars().any(char::is_control) {
            return Err(MemoryError::InvalidArgument(format!(
                "pool name {name:?} must be non-empty and contain no '/' or control characters"
            )));
        }
        let mut children = self.children.lock();
        if let Some(existing) = children.iter().find(|c| c.name == name) {
            if limit.is_some() && existing.limit != limit {
                return Err(MemoryError::InvalidArgument(format!(
                    "pool '{}' exists with limit {:?}, asked for {:?}",
                    existing.path, existing.limit, limit
                )));
            }
            return Ok(existing.clone());
        }
        let node = Arc::new(PoolNode {
            name: name.to_string(),
            path: format!("{}/{}", self.path, name),
            limit,
            used: AtomicU64::new(0),
            held: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            parent: Some(self.clone()),
            children: Mutex::new(Vec::new()),
            alloc: AllocSlack::default(),
        });
        children.push(node.clone());
        Ok(node)
    }

    /// Empties the child lists of this node's whole subtree (breaking the parent/child cycle,
    /// see the module docs) and drops the nodes no one else holds. Iterative, deepest nodes
    /// first, so neither the walk nor the drops recurse, however deep the tree: a node is
    /// dropped while its parent is still held by the list, so no drop cascades up a chain.
    pub(crate) fn dismantle(&self) {
        let mut nodes: Vec<Arc<PoolNode>> = std::mem::take(&mut *self.children.lock());
        let mut at = 0;
        while at < nodes.len() {
            let children = std::mem::take(&mut *nodes[at].children.lock());
            nodes.extend(children);
            at += 1;
        }
        // Parents come before their children in `nodes`: pop from the end.
        while let Some(node) = nodes.pop() {
            drop(node);
        }
    }

    /// Iterates this node and its ancestors, leaf first.
    pub(crate) fn lineage(&self) -> impl Iterator<Item = &PoolNode> {
        std::iter::successors(Some(self), |n| n.parent.as_deref())
    }

    /// True if `self` is `ancestor` or lies below it.
    pub(crate) fn is_within(&self, ancestor: &PoolNode) -> bool {
        self.lineage().any(|n| std::ptr::eq(n, ancestor))
    }

    /// Bytes charged to this node and its descendants now (a read-out).
    pub(crate) fn used(&self) -> u64 {
        // Relaxed: a statistic; callers draw no conclusion about other counters from it.
        self.used.load(Ordering::Relaxed)
    }

    /// The highest `held` reached: the most the pool held (a read-out; module docs).
    pub(crate) fn peak(&self) -> u64 {
        // Relaxed: a statistic, like `used`.
        self.peak.load(Ordering::Relaxed)
    }

    /// Adds `bytes` to this node and every ancestor, or to none of them. Returns the root's new
    /// `used`. The root's RMW acquires (see [`PoolNode::charge_one`]).
    pub(crate) fn charge(self: &Arc<Self>, bytes: u64) -> std::result::Result<u64, Refusal> {
        let mut root_used = 0;
        for node in self.lineage() {
            match node.charge_one(bytes) {
                Ok(now) => {
                    root_used = now;
                    crate::sync::test_point("charge:level");
                }
                Err(used) => {
                    // Roll back the levels below the refusing one, charged by this call.
                    for done in self.lineage().take_while(|n| !std::ptr::eq(*n, node)) {
                        debug_assert!(!done.is_root(), "the root is never below another level");
                        // Relaxed: a level below the refusing one is never the root (see the
                        // module docs: non-root counters publish nothing).
                        done.used.fetch_sub(bytes, Ordering::Relaxed);
                    }
                    let refusing = self
                        .lineage_arcs()
                        .find(|a| std::ptr::eq(a.as_ref(), node))
                        .unwrap_or_else(|| self.clone());
                    return Err(Refusal {
                        node: refusing,
                        used,
                    });
                }
            }
        }
        Ok(root_used)
    }

    /// Adds `bytes` to this node and every ancestor whatever their limits (an over-commit: see
    /// `Budget::force_grow`). Never fails; a level may end above its limit, and a later charge of
    /// that level is then refused until enough is released. Returns the root's new `used`. The
    /// root's RMW acquires, as in [`PoolNode::charge_one`]; below the root, `Relaxed` (module
    /// docs). Callers keep `bytes <= MAX_REQUEST_BYTES` so no counter can overflow.
    pub(crate) fn force_charge(&self, bytes: u64) -> u64 {
        let mut root_used = 0;
        for node in self.lineage() {
            let order = if node.is_root() {
                Ordering::Acquire
            } else {
                Ordering::Relaxed
            };
            root_used = node.used.fetch_add(bytes, order).wrapping_add(bytes);
        }
        root_used
    }

    /// Confirms a grow of `bytes` that is charged (`charge` or `force_charge`) and will not be
    /// rolled back: adds them to `held` of this node and its ancestors and raises their peaks to
    /// the new `held` (module docs). Called once the grow has fully succeeded, so a refused or
    /// rolled-back charge never shows as a peak, whatever other threads do meanwhile.
    pub(crate) fn confirm(&self, bytes: u64) {
        for node in self.lineage() {
            // Relaxed (all): `held` and the peak are statistics; RMW atomicity alone keeps
            // `held` exact and `fetch_max` keeps the peak monotonic.
            let now = node
                .held
                .fetch_add(bytes, Ordering::Relaxed)
                .wrapping_add(bytes);
            if now > node.peak.load(Ordering::Relaxed) {
                node.peak.fetch_max(now, Ordering::Relaxed);
            }
        }
    }

    /// Undoes a charge that was never confirmed (a grow refused after charging, or one that
    /// retries): like [`uncharge`](Self::uncharge), `held` untouched. Returns the root's new
    /// `used`.
    pub(crate) fn rollback(&self, bytes: u64) -> u64 {
        self.uncharge_used(bytes)
    }

    /// Removes `bytes` from this node and every ancestor. The caller guarantees they were charged
    /// and confirmed (and that the charge happens-before this call: see `ConsumerState::size`).
    /// Returns the root's new `used`.
    pub(crate) fn uncharge(&self, bytes: u64) -> u64 {
        for node in self.lineage() {
            // Relaxed: a statistic (see `confirm`).
            let prev = node.held.fetch_sub(bytes, Ordering::Relaxed);
            debug_assert!(prev >= bytes, "pool '{}' released below zero", node.path);
        }
        self.uncharge_used(bytes)
    }

    /// Removes `bytes` from `used` of this node and every ancestor (see `uncharge`, `rollback`).
    fn uncharge_used(&self, bytes: u64) -> u64 {
        let mut root_used = 0;
        for node in self.lineage() {
            let order = if node.is_root() {
                // SeqCst on the root: a release then reads the `closed` flag (SeqCst) while `close`
                // sets it and then reads the root (SeqCst): a store-buffering pair, where only a
                // single total order guarantees one side sees the other, so bytes released during
                // a close are handed back by one of them. On aarch64 this is the same `ldaddal` as
                // AcqRel would be; it costs only on the release path.
                Ordering::SeqCst
            } else {
                // Relaxed below the root (module docs).
                Ordering::Relaxed
            };
            let prev = node.used.fetch_sub(bytes, order);
            debug_assert!(prev >= bytes, "pool '{}' uncharged below zero", node.path);
            root_used = prev.wrapping_sub(bytes);
        }
        root_used
    }

    /// Adds `bytes` to this node alone, within its limit; returns the new `used`, or the current
    /// one on refusal.
    ///
    /// On the root every access is `Acquire`: a grow reads `reserved` right after this RMW and
    /// must see every hand-back whose un-claim of the root (a `Release` RMW) this RMW comes
    /// after (edge 1 in `budget`); and a refusal read here must see the `claims` count of every
    /// claim the value includes, which the claim's root RMW releases (edge 2). Every write to
    /// `used` is an RMW, so the release sequences reach any later value. A charge publishes
    /// nothing itself (the grant and the reservation size that follow it do), so no `Release`.
    /// Below the root, `Relaxed` (module docs).
    fn charge_one(&self, bytes: u64) -> std::result::Result<u64, u64> {
        let order = if self.is_root() {
            Ordering::Acquire
        } else {
            Ordering::Relaxed
        };
        match self.limit {
            None => Ok(self.used.fetch_add(bytes, order) + bytes),
            Some(limit) => {
                let mut cur = self.used.load(order);
                loop {
                    match cur.checked_add(bytes) {
                        Some(new) if new <= limit => {}
                        _ => return Err(cur),
                    }
                    match self.used.compare_exchange(cur, cur + bytes, order, order) {
                        Ok(_) => return Ok(cur + bytes),
                        Err(actual) => cur = actual,
                    }
                }
            }
        }
    }

    fn lineage_arcs(self: &Arc<Self>) -> impl Iterator<Item = Arc<PoolNode>> {
        std::iter::successors(Some(self.clone()), |n| n.parent.clone())
    }

    /// Every node of the subtree, parents before children (depth first, children in creation
    /// order), with depth. Iterative, like [`dismantle`](Self::dismantle): close and slack
    /// trimming walk the tree in quantum mode, and a tree thousands deep must not overflow the
    /// stack of the thread that closes it.
    pub(crate) fn walk(self: &Arc<Self>, depth: usize, out: &mut Vec<(usize, Arc<PoolNode>)>) {
        let mut stack = vec![(depth, self.clone())];
        while let Some((d, node)) = stack.pop() {
            // Children are copied under their lock and pushed without it, last first, so they
            // come out in creation order.
            let children: Vec<Arc<PoolNode>> = node.children.lock().clone();
            stack.extend(children.into_iter().rev().map(|c| (d + 1, c)));
            out.push((d, node));
        }
    }
}
