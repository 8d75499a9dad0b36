//! The pool tree: named nodes with optional limits, `used` and `peak` counters.
//!
//! Charging a pool charges every ancestor up to the root (the task). Each level is one atomic
//! read-modify-write; a level with a limit uses a compare-and-swap loop so the limit can never be
//! exceeded, even transiently. If any level refuses, the levels already charged are rolled back
//! (Doris `try_consume`), so a failed charge leaves every counter as it was.
//!
//! Orderings: `used` and `peak` below the root are statistics and limits of their own node; no
//! other memory is published through them, so `Relaxed` is enough (every RMW on one atomic is
//! totally ordered with the others on it, so limits hold exactly). The root's `used` also takes
//! part in the cross-counter invariant `used <= reserved` with the manager's `reserved`, so every
//! RMW here is `SeqCst`-capable: the charge/uncharge use `SeqCst`, which on x86 is the same
//! locked instruction as `Relaxed`.

use crate::sync::{AtomicU64, Ordering};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::sync::Mutex;

use crate::error::{MemoryError, Result};
use crate::manager::Inner;
use crate::reservation::Reservation;
use crate::spill::{Spiller, SpillerRegistration};
use crate::MemoryManager;

/// One node of the pool tree (shared by all [`Pool`] handles on it).
pub(crate) struct PoolNode {
    pub(crate) name: String,
    pub(crate) path: String,
    pub(crate) limit: Option<u64>,
    pub(crate) used: AtomicU64,
    pub(crate) peak: AtomicU64,
    pub(crate) parent: Option<Arc<PoolNode>>,
    pub(crate) children: Mutex<Vec<Arc<PoolNode>>>,
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
            peak: AtomicU64::new(0),
            parent: None,
            children: Mutex::new(Vec::new()),
        })
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
            peak: AtomicU64::new(0),
            parent: Some(self.clone()),
            children: Mutex::new(Vec::new()),
        });
        children.push(node.clone());
        Ok(node)
    }

    /// Iterates this node and its ancestors, leaf first.
    pub(crate) fn lineage(&self) -> impl Iterator<Item = &PoolNode> {
        std::iter::successors(Some(self), |n| n.parent.as_deref())
    }

    /// True if `self` is `ancestor` or lies below it.
    pub(crate) fn is_within(&self, ancestor: &PoolNode) -> bool {
        self.lineage().any(|n| std::ptr::eq(n, ancestor))
    }

    /// Adds `bytes` to this node and every ancestor, or to none of them. Returns the root's new
    /// `used`.
    pub(crate) fn charge(self: &Arc<Self>, bytes: u64) -> std::result::Result<u64, Refusal> {
        let mut root_used = 0;
        for node in self.lineage() {
            match node.charge_one(bytes) {
                Ok(now) => root_used = now,
                Err(used) => {
                    // Roll back the levels below the refusing one, charged by this call.
                    for done in self.lineage().take_while(|n| !std::ptr::eq(*n, node)) {
                        done.used.fetch_sub(bytes, Ordering::SeqCst);
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

    /// Raises the peaks of this node and its ancestors to their current usage. Called once a grow
    /// has fully succeeded, so a refused or rolled-back charge of this thread never shows as a
    /// peak (a concurrent thread's in-flight charge may: peaks are high-water marks of charges).
    pub(crate) fn record_peaks(&self) {
        for node in self.lineage() {
            let now = node.used.load(Ordering::Relaxed);
            if now > node.peak.load(Ordering::Relaxed) {
                node.peak.fetch_max(now, Ordering::Relaxed);
            }
        }
    }

    /// Removes `bytes` from this node and every ancestor. The caller guarantees they were charged.
    /// Returns the root's new `used`.
    pub(crate) fn uncharge(&self, bytes: u64) -> u64 {
        let mut root_used = 0;
        for node in self.lineage() {
            let prev = node.used.fetch_sub(bytes, Ordering::SeqCst);
            debug_assert!(prev >= bytes, "pool '{}' uncharged below zero", node.path);
            root_used = prev.wrapping_sub(bytes);
        }
        root_used
    }

    /// Adds `bytes` to this node alone, within its limit; returns the new `used`, or the current
    /// one on refusal.
    fn charge_one(&self, bytes: u64) -> std::result::Result<u64, u64> {
        match self.limit {
            None => Ok(self.used.fetch_add(bytes, Ordering::SeqCst) + bytes),
            Some(limit) => {
                let mut cur = self.used.load(Ordering::Relaxed);
                loop {
                    match cur.checked_add(bytes) {
                        Some(new) if new <= limit => {}
                        _ => return Err(cur),
                    }
                    match self.used.compare_exchange(
                        cur,
                        cur + bytes,
                        Ordering::SeqCst,
                        Ordering::Relaxed,
                    ) {
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

    /// Every node of the subtree, parents before children, with depth.
    pub(crate) fn walk(self: &Arc<Self>, depth: usize, out: &mut Vec<(usize, Arc<PoolNode>)>) {
        out.push((depth, self.clone()));
        let children: Vec<Arc<PoolNode>> = self.children.lock().clone();
        for c in children {
            c.walk(depth + 1, out);
        }
    }
}

/// A block of memory charged to a pool, freed when dropped (like a `Box<[MaybeUninit<u8>]>`).
///
/// The memory is uninitialized when allocated. The value owns it exclusively, so safe code can
/// use it through `&mut self`; closing the manager never frees it under the owner.
pub struct Allocation {
    ptr: NonNull<u8>,
    layout: std::alloc::Layout,
    mgr: Arc<Inner>,
}

// SAFETY: an `Allocation` owns its block exclusively, like a `Box<[u8]>`; the manager it points to
// is `Send + Sync`.
unsafe impl Send for Allocation {}
// SAFETY: `&Allocation` only exposes the pointer value and the size; writing requires `&mut`.
unsafe impl Sync for Allocation {}

impl Allocation {
    /// Start of the block (aligned as asked).
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Size of the block in bytes.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Always false: zero-sized allocations are refused.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The block as bytes that may be uninitialized.
    pub fn as_uninit_mut(&mut self) -> &mut [std::mem::MaybeUninit<u8>] {
        // SAFETY: the block is `len` bytes, owned exclusively by `self` (borrowed mutably here),
        // and valid until `self` is dropped; `MaybeUninit` makes no claim about its contents.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast(), self.layout.size()) }
    }
}

impl std::fmt::Debug for Allocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocation")
            .field("ptr", &self.ptr)
            .field("len", &self.len())
            .finish()
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        self.mgr.free_owned(self.ptr, self.layout);
    }
}

/// A handle on one pool of a manager. Cheap to clone; `Send + Sync`.
///
/// Memory is taken from a pool either as a [`Reservation`] (accounting only: the caller allocates
/// itself, as an operator with its own buffers or JVM off-heap buffers do) or as an allocation
/// ([`Pool::allocate`]) whose memory the manager owns and frees at close if the operator forgets.
#[derive(Clone)]
pub struct Pool {
    pub(crate) node: Arc<PoolNode>,
    pub(crate) mgr: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("path", &self.node.path)
            .field("limit", &self.node.limit)
            .field("used", &self.used())
            .field("peak", &self.peak())
            .finish()
    }
}

impl Pool {
    /// The pool's own name (last path element).
    pub fn name(&self) -> &str {
        &self.node.name
    }

    /// The full path from the root, e.g. `root/sort/buffers`.
    pub fn path(&self) -> &str {
        &self.node.path
    }

    /// The pool's limit in bytes, if any.
    pub fn limit(&self) -> Option<u64> {
        self.node.limit
    }

    /// Bytes charged to this pool and its descendants now.
    pub fn used(&self) -> u64 {
        self.node.used.load(Ordering::Relaxed)
    }

    /// The highest `used` seen.
    pub fn peak(&self) -> u64 {
        self.node.peak.load(Ordering::Relaxed)
    }

    /// The manager this pool belongs to.
    pub fn manager(&self) -> MemoryManager {
        MemoryManager {
            inner: self.mgr.clone(),
        }
    }

    /// Gets or creates the child pool `name` with an optional limit in bytes. Asking again with
    /// the same name returns the same pool (an error if a different limit is asked).
    pub fn child(&self, name: &str, limit: Option<u64>) -> Result<Pool> {
        Ok(Pool {
            node: self.node.child(name, limit)?,
            mgr: self.mgr.clone(),
        })
    }

    /// A new, empty reservation of this pool for `consumer` (a name for reports and errors).
    pub fn reservation(&self, consumer: impl Into<String>) -> Reservation {
        Reservation::new(self.mgr.clone(), self.node.clone(), consumer.into())
    }

    /// Registers a spiller that frees memory of this pool when asked. Unregistered when the
    /// returned value is dropped.
    pub fn register_spiller(
        &self,
        name: impl Into<String>,
        spiller: Arc<dyn Spiller>,
    ) -> SpillerRegistration {
        self.mgr
            .spillers
            .register(&self.mgr, name.into(), self.node.clone(), spiller)
    }

    /// Allocates `size` bytes aligned to `align` (a power of two), charged to this pool. The
    /// memory is uninitialized. Free it with [`Pool::free`] (through any pool of the manager);
    /// whatever is still live when the manager closes is freed then and reported as leaked.
    ///
    /// This is the C-style interface (for FFI and operators that manage raw blocks); in Rust
    /// prefer [`Pool::allocate_owned`], whose memory is never freed under its owner.
    pub fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        Ok(self.mgr.allocate(&self.node, size, align, false)?.0)
    }

    /// Allocates like [`Pool::allocate`] but returns an owning [`Allocation`] that frees the
    /// memory when dropped. If the manager closes first, the allocation's bytes are released from
    /// the accounting (and reported), but the memory stays valid until the value is dropped.
    pub fn allocate_owned(&self, size: usize, align: usize) -> Result<Allocation> {
        let (ptr, layout) = self.mgr.allocate(&self.node, size, align, true)?;
        Ok(Allocation {
            ptr,
            layout,
            mgr: self.mgr.clone(),
        })
    }

    /// Frees an allocation of this manager; returns its size in bytes. A pointer the manager does
    /// not know (foreign, or freed already) is an error and nothing changes.
    pub fn free(&self, ptr: NonNull<u8>) -> Result<usize> {
        self.mgr.free(ptr)
    }
}
