//! The public pool handle ([`Pool`]) and owned allocations ([`Allocation`]). The accounting
//! itself is the pool tree (`tree`); growth and release go through the task's budget (`budget`).

use std::ptr::NonNull;
use std::sync::Arc;

use crate::budget::Budget;
use crate::error::Result;
use crate::reservation::Reservation;
use crate::spill::{Spiller, SpillerRegistration};
use crate::tree::PoolNode;

/// A block of memory charged to a pool, freed when dropped (like a `Box<[MaybeUninit<u8>]>`).
///
/// The memory is uninitialized when allocated. The value owns it exclusively, so safe code can
/// use it through `&mut self`; closing the manager never frees it under the owner.
pub struct Allocation {
    ptr: NonNull<u8>,
    len: usize,
    /// Keeps the task's heap, which holds the block, alive (see `heap`).
    budget: Arc<Budget>,
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
        self.len
    }

    /// Always false: zero-sized allocations are refused.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The block as bytes that may be uninitialized.
    pub fn as_uninit_mut(&mut self) -> &mut [std::mem::MaybeUninit<u8>] {
        // SAFETY: the block is `len` bytes, owned exclusively by `self` (borrowed mutably here),
        // and valid until `self` is dropped; `MaybeUninit` makes no claim about its contents.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast(), self.len) }
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
        self.budget.free_owned(self.ptr);
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
    pub(crate) budget: Arc<Budget>,
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
        self.node.used()
    }

    /// The highest `used` seen.
    pub fn peak(&self) -> u64 {
        self.node.peak()
    }

    /// Counts `bytes` the task's spills wrote, for its manager (see
    /// [`MemoryManager::note_spill_written`](crate::MemoryManager::note_spill_written)).
    pub fn note_spill_written(&self, bytes: u64) {
        self.budget.note_spill_written(bytes);
    }

    /// Gets or creates the child pool `name` with an optional limit in bytes. Asking again with
    /// the same name returns the same pool (an error if a different limit is asked).
    pub fn child(&self, name: &str, limit: Option<u64>) -> Result<Pool> {
        Ok(Pool {
            node: self.node.child(name, limit)?,
            budget: self.budget.clone(),
        })
    }

    /// A new, empty reservation of this pool for `consumer` (a name for reports and errors).
    pub fn reservation(&self, consumer: impl Into<String>) -> Reservation {
        Reservation::new(self.budget.clone(), self.node.clone(), consumer.into())
    }

    /// Registers a spiller that frees memory of this pool when asked. Unregistered when the
    /// returned value is dropped.
    pub fn register_spiller(
        &self,
        name: impl Into<String>,
        spiller: Arc<dyn Spiller>,
    ) -> SpillerRegistration {
        self.budget
            .register_spiller(name.into(), self.node.clone(), spiller)
    }

    /// Allocates `size` bytes aligned to `align` (a power of two), charged to this pool. The
    /// memory is uninitialized. Free it with [`Pool::free`] (through any pool of the manager, on
    /// any thread). Whatever is still live when the manager closes is reported as leaked and its
    /// accounting released; its memory belongs to the task's heap from then on (a late `free` of
    /// it is refused), which is destroyed, with every leaked block, when the manager's last handle
    /// (the manager, a `Pool`, a `Reservation` or an [`Allocation`]) is dropped. The provider
    /// drops its handles at close, so for engines and Java that is the close itself.
    ///
    /// This is the C-style interface (for FFI and operators that manage raw blocks); in Rust
    /// prefer [`Pool::allocate_owned`], whose memory is never freed under its owner.
    pub fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        self.budget.allocate(&self.node, size, align, false)
    }

    /// Allocates like [`Pool::allocate`] but returns an owning [`Allocation`] that frees the
    /// memory when dropped. If the manager closes first, the allocation's bytes are released from
    /// the accounting (and reported), but the memory stays valid until the value is dropped.
    pub fn allocate_owned(&self, size: usize, align: usize) -> Result<Allocation> {
        let ptr = self.budget.allocate(&self.node, size, align, true)?;
        Ok(Allocation {
            ptr,
            len: size,
            budget: self.budget.clone(),
        })
    }

    /// Frees an allocation of this manager; returns its size in bytes. A pointer the manager does
    /// not know (foreign, another manager's, interior, freed already, or leaked at close) is an
    /// error and nothing changes; it is never read unless it lies in this manager's heap.
    pub fn free(&self, ptr: NonNull<u8>) -> Result<usize> {
        self.budget.free(ptr)
    }
}

/// The upward link from a reservation to its pool lives here, above both types, so that
/// `reservation` does not import `pool` (module layering: see the crate docs).
impl Reservation {
    /// The pool this reservation charges.
    pub fn pool(&self) -> Pool {
        Pool {
            node: self.state.node.clone(),
            budget: self.budget.clone(),
        }
    }
}
