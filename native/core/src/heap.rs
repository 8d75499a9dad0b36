//! The task's heap: every block made through `Pool::allocate` comes from one mimalloc v3 heap per
//! manager, with a 32-byte header of ours in front of it. There is no table of live allocations:
//! the header says which pool the block is charged to and how big it is, and the heap itself is
//! the set of the manager's blocks.
//!
//! ```text
//!  base (from mi_heap_malloc[_aligned])            user pointer (returned, aligned as asked)
//!   │                                                │
//!   ▼                                                ▼
//!   [ pad (align > 32) ][ base | node | size | check ][ size bytes ... ]
//!                         user-32 user-24 user-16 user-8
//! ```
//!
//! **Why mimalloc v3 heaps.** A v3 heap (`mi_heap_new`) is first-class: any thread allocates from
//! it (`mi_heap_malloc` finds or makes the calling thread's `theap` of that heap; the one-entry
//! thread-local cache makes that a compare on the fast path) and any thread frees into it
//! (`mi_free` finds the page from the address). `mi_heap_destroy` frees every block still live in
//! it, whoever allocated it, without visiting them. `mi_heap_contains(heap, p)` decides "is `p`
//! in a page of this heap" from mimalloc's page map alone, without touching `p` (NULL for memory
//! mimalloc never mapped). Checked in the source we build (third_party/libmimalloc-sys: mimalloc v3.4.3;
//! `include/mimalloc.h` "Heaps: first-class. Can allocate from any thread (and be free'd from any
//! thread)"; `src/heap.c` `mi_heap_of`/`mi_heap_destroy`).
//!
//! **Free, refusing what is not ours without reading it.** `free(p)` checks, in order: `p` is
//! 16-aligned (every user pointer is); the header words `[p-32, p)` lie in pages of *this*
//! manager's heap (two page-map lookups: `p-32` and `p-1`), so reading them reads memory this
//! manager's heap owns and has mapped; the `check` word equals a per-heap secret mixed with `p`,
//! tagged live. Only then is it swapped to 0 with a compare-and-swap, so of two racing frees one
//! wins and the other is refused as a double free. A malloc'd pointer, a pointer of another task's
//! heap, a stale or interior pointer fail one of these checks. The residual risk is an interior
//! pointer into a live block of this heap whose 8 bytes before it hold exactly the check word
//! for that address (the engine would have to write it on purpose; the secret is per heap).
//! A double free is recognised as such while the block is not reused (mimalloc writes its free
//! list link only at the block's first word, never over `check`); once mimalloc
//! reuses the address for a new block of this manager, a stale pointer equal to the new block's
//! is that block (as with any address-keyed table). "Mapped" relies on mimalloc committing a
//! page it hands to a heap (the default: no `page_commit_on_demand`; on Linux with overcommit,
//! reserved memory is readable anyway).
//!
//! **What close does, and when memory goes back.** Each pool counts its live blocks' bytes and
//! number (`AllocSlack`), so `close` reports the leaks per pool exactly (bytes and count, owned
//! ones apart) and releases their accounting, without visiting the heap. The heap is destroyed
//! (every leaked block freed, whoever allocated it) when the budget drops, i.e. when the last
//! handle on the manager goes: the `MemoryManager`, its `Pool`s and `Reservation`s, and the
//! owned [`Allocation`](crate::Allocation)s. That is what makes owned allocations that outlive
//! close safe (they keep the heap alive and stay valid until dropped) and what makes destroying
//! the heap race-free without a gate on the hot path: `mi_heap_destroy` must not run while another
//! thread allocates from the heap, and no thread can once no handle is left. (Visiting the blocks
//! at close, `mi_heap_visit_blocks`, has the same requirement, "we assume we are the only thread
//! running with this heap", so close cannot free leaked blocks early without a gate costing every
//! allocate and free two more shared writes.) After close a raw free is refused (the block was
//! reported as leaked; the heap frees it). The provider drops its
//! handles of a manager when it closes it, so for engines and Java the memory is back at close.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use libmimalloc_sys as mi;

use crate::tree::PoolNode;

/// Bytes of header in front of every block with an alignment of at most 32 (else `align` bytes).
pub(crate) const HEADER: usize = 32;
/// The low bits of the check word: the block's state.
const LIVE: u64 = 1;
const OWNED: u64 = 2;
const STATE: u64 = 3;

extern "C" {
    // Declared here: libmimalloc-sys 0.1.49 binds the v2 name (mi_heap_check_owned); this is the
    // v3 symbol (mimalloc v3.4.3, third_party/libmimalloc-sys).
    fn mi_heap_contains(heap: *const mi::mi_heap_t, p: *const std::ffi::c_void) -> bool;
}

/// Heaps alive in the process (created and not yet destroyed); for tests and the stats.
static LIVE_HEAPS: AtomicUsize = AtomicUsize::new(0);

/// Task heaps alive in the process (each manager that allocated has one until it drops).
pub fn live_task_heaps() -> usize {
    // Relaxed: a read-out.
    LIVE_HEAPS.load(Ordering::Relaxed)
}

/// Returns the free memory of every task heap of the process to the kernel now: the pages of
/// destroyed heaps (ended tasks) and freed huge blocks, which mimalloc otherwise gives back only
/// after its purge delay (1 s in v3.4.3) *and* only when some thread allocates from it again. An
/// executor whose tasks have ended and that allocates nothing keeps them resident (measured: 64 MiB
/// of a destroyed heap stayed resident for seconds until this ran). Called by the container
/// governor's trim step; cheap when nothing is free. Pages a live heap still holds for its threads
/// (partly used, or empty and not yet retired by their thread) stay with it.
pub fn purge_task_heaps() {
    // SAFETY: mi_malloc/mi_free/mi_collect have no preconditions and may be called from any
    // thread. mi_collect works through the calling thread's part of mimalloc's main heap (never a
    // task heap, so this thread takes no part in any task heap's destruction), which a thread that
    // never allocated from mimalloc does not have: a one-byte allocation makes it. The forced
    // collect then purges the free memory of all arenas, which the task heaps share; mimalloc
    // lets one thread purge at a time.
    unsafe {
        mi::mi_free(mi::mi_malloc(1));
        mi::mi_collect(true);
    }
}

struct HeapPtr(*mut mi::mi_heap_t);
// SAFETY: a v3 heap may be used from any thread (module docs); the pointer is only passed to
// mimalloc's thread-safe heap functions, and destroyed with exclusive access (`Drop`).
unsafe impl Send for HeapPtr {}
// SAFETY: as above.
unsafe impl Sync for HeapPtr {}

/// One manager's heap. Created on the first allocation (a manager that never allocates costs
/// nothing), destroyed on drop.
pub(crate) struct TaskHeap {
    heap: OnceLock<HeapPtr>,
    secret: u64,
    /// One freed huge block per CPU shard (see `CACHE_MIN`), kept for the next huge allocation
    /// made on a CPU of that shard that it fits.
    cache: [Slot; SHARDS],
}

/// A cache slot on its own line: threads on CPUs of different shards do not share one.
#[repr(align(64))]
struct Slot(AtomicPtr<u8>);

/// Blocks above mimalloc's largest size class (`MI_LARGE_MAX_OBJ_SIZE`, 512 KiB in v3.4.3) get a
/// page of their own ("singleton" pages) that `mi_free` hands back to the arena and the next
/// allocation takes again: ~280 ns per allocate+free of 1 MiB in a loop (`cargo bench -p
/// nativemem-core --bench core -- allocate_free`, 2026-12-07), where glibc reuses its top chunk in
/// ~21 ns. Keeping the last freed block of that range (one swap on each side) brings the pair to
/// ~40 ns in the steady state of an operator reusing its buffer sizes.
///
/// Only that range is cached: below it mimalloc's own free lists cost ~8 ns more per pair than a
/// cache (48 vs 40 ns at 4 KiB and 64 KiB, same bench), and a cache shared by the task's threads
/// costs far more than that once two threads of one task allocate one size at once: every swap
/// moves the slot's cache line between their cores (the ABI bench's 2 threads × 1 manager rows
/// went from ~90 to 306 ns per 4 KiB pair with a slot per power-of-two class). The slots are
/// sharded by the CPU the caller runs on (`sched_getcpu`, read from the kernel's rseq area by
/// glibc), so two threads of one task on two cores use two slots, and two threads on one core
/// never run at once.
///
/// A cached block stays a live block of the heap (destroying the heap frees it). It is at most
/// 2 MiB, so a task keeps at most `SHARDS` × 2 MiB = 4 MiB of freed blocks in its heap until it
/// allocates again or drops, and larger blocks go back to mimalloc at once. Those bytes are no
/// longer charged (the pool released them at the free), like the freed memory any allocator keeps:
/// the bound is kept small because Spark cannot see them.
const CACHE_MIN: usize = 512 << 10;
const CACHE_MAX: usize = 2 << 20;
/// Cache shards; a CPU's shard is its number modulo this.
const SHARDS: usize = 2;

/// The cache slot of a block of `need` bytes (header included) for the calling thread, if blocks
/// of that size are cached.
#[inline]
fn slot_of(need: usize) -> Option<usize> {
    if need <= CACHE_MIN || need > CACHE_MAX {
        return None;
    }
    Some(current_cpu() % SHARDS)
}

/// The CPU the calling thread runs on (0 where the platform does not say): only a shard hint.
#[inline]
fn current_cpu() -> usize {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sched_getcpu has no preconditions; -1 (error) maps to shard 0 below.
        let cpu = unsafe { libc::sched_getcpu() };
        usize::try_from(cpu).unwrap_or(0)
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

/// What a free found in a valid header.
pub(crate) struct Block {
    pub(crate) node: *const PoolNode,
    pub(crate) size: u64,
    /// The address mimalloc returned (the user pointer minus the header).
    base: usize,
}

/// Why a free was refused.
pub(crate) enum Refused {
    /// Not a block of this heap (or its header does not check).
    Unknown,
    /// A block of this heap freed already.
    Freed,
    /// An owned block: its `Allocation` frees it.
    Owned,
}

fn mix(x: u64) -> u64 {
    // splitmix64's finaliser: every input bit moves every output bit.
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl TaskHeap {
    pub(crate) fn new() -> TaskHeap {
        // The secret only has to differ between heaps and be unknown to engines that did not
        // read this process's memory: the heap's own address, a process-wide counter and the
        // clock, mixed.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        // Relaxed: only uniqueness matters.
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        TaskHeap {
            heap: OnceLock::new(),
            secret: mix(seq ^ mix(t) ^ (&SEQ as *const _ as u64)),
            cache: std::array::from_fn(|_| Slot(AtomicPtr::new(std::ptr::null_mut()))),
        }
    }

    #[inline]
    fn get(&self) -> *mut mi::mi_heap_t {
        match self.heap.get() {
            Some(h) => h.0,
            None => self.create(),
        }
    }

    #[cold]
    fn create(&self) -> *mut mi::mi_heap_t {
        self.heap
            .get_or_init(|| {
                // SAFETY: mi_heap_new has no preconditions; NULL (out of memory) is kept and
                // makes every allocation of this manager fail.
                let h = unsafe { mi::mi_heap_new() };
                if !h.is_null() {
                    // Relaxed: a read-out.
                    LIVE_HEAPS.fetch_add(1, Ordering::Relaxed);
                }
                HeapPtr(h)
            })
            .0
    }

    #[inline]
    fn check(&self, user: usize, state: u64) -> u64 {
        (mix(user as u64 ^ self.secret) & !STATE) | state
    }

    /// Allocates `size` bytes aligned to `align` (a power of two) with a header naming `node`;
    /// None when the heap cannot (out of memory). `size + align + 32` must not overflow (the
    /// caller's `Layout` check bounds `size` to `isize::MAX`).
    #[inline]
    pub(crate) fn alloc(
        &self,
        node: *const PoolNode,
        size: usize,
        align: usize,
        owned: bool,
    ) -> Option<NonNull<u8>> {
        let heap = self.get();
        if heap.is_null() {
            return None;
        }
        let header = align.max(HEADER);
        let need = size.checked_add(header)?;
        let base = match slot_of(need) {
            Some(slot) => self.cached_alloc(heap, slot, need, align),
            None => Self::heap_alloc(heap, need, align),
        };
        let base = NonNull::new(base.cast::<u8>())?;
        // SAFETY: the block has `header + size` bytes, so `base + header` is in it.
        let user = unsafe { base.as_ptr().add(header) };
        let words = user.cast::<u64>();
        // SAFETY: `user` is 16-aligned and the three words before it lie inside the block just
        // allocated (header >= 32), which nothing else references yet.
        unsafe {
            words.sub(4).write(base.as_ptr() as u64);
            words.sub(3).write(node as u64);
            words.sub(2).write(size as u64);
            words
                .sub(1)
                .write(self.check(user as usize, if owned { OWNED } else { LIVE }));
        }
        NonNull::new(user)
    }

    #[inline]
    fn heap_alloc(heap: *mut mi::mi_heap_t, need: usize, align: usize) -> *mut std::ffi::c_void {
        if align <= 16 {
            // SAFETY: `heap` is this manager's live heap (destroyed only on drop, with `&mut`).
            // mimalloc blocks are 16-aligned (MI_MAX_ALIGN_SIZE), so base + 32 is too.
            unsafe { mi::mi_heap_malloc(heap, need) }
        } else {
            // SAFETY: as above; `align` is a power of two (checked by the caller).
            unsafe { mi::mi_heap_malloc_aligned(heap, need, align) }
        }
    }

    #[inline]
    fn cached_alloc(
        &self,
        heap: *mut mi::mi_heap_t,
        slot: usize,
        need: usize,
        align: usize,
    ) -> *mut std::ffi::c_void {
        let slot = &self.cache[slot].0;
        // Relaxed: a peek, so an empty slot is not written; Acquire on the swap: the block's
        // memory, from the free that stored it.
        let cached = if slot.load(Ordering::Relaxed).is_null() {
            std::ptr::null_mut()
        } else {
            slot.swap(std::ptr::null_mut(), Ordering::Acquire)
        };
        if !cached.is_null() {
            // SAFETY: a block of this heap that nothing else references (taken from the slot).
            let usable = unsafe { mi::mi_usable_size(cached.cast()) };
            if usable >= need && usable - need <= need / 4 && cached as usize % align.max(16) == 0 {
                return cached.cast();
            }
            // SAFETY: as above; freed once (it left the slot).
            unsafe { mi::mi_free(cached.cast()) };
        }
        Self::heap_alloc(heap, need, align)
    }

    /// The header of `p` if `p` is a block of this heap; reads nothing outside this heap.
    #[inline]
    fn header(&self, p: usize) -> Option<*const u64> {
        if p % 16 != 0 || p < HEADER {
            return None;
        }
        let heap = self.heap.get()?.0;
        if heap.is_null() {
            return None;
        }
        let words = p as *const u64;
        // SAFETY: mi_heap_contains only consults mimalloc's page map and the page it names (never
        // the memory at the address), and returns false for memory mimalloc does not manage.
        let ours = unsafe {
            mi_heap_contains(heap, (p - HEADER) as *const _)
                && mi_heap_contains(heap, (p - 1) as *const _)
        };
        ours.then_some(words)
    }

    /// Takes the block at `p` back from its owner (`owned` says which kind the caller may take):
    /// on success the block is marked free and its node and size returned; the caller then
    /// releases its accounting and calls [`TaskHeap::release_block`].
    #[inline]
    pub(crate) fn take(&self, p: usize, owned: bool) -> Result<Block, Refused> {
        let words = self.header(p).ok_or(Refused::Unknown)?;
        // SAFETY: `header` checked that `[p-32, p)` lies in pages of this heap, which stay mapped
        // while the heap lives (it lives as long as `self`).
        let check = unsafe { &*words.sub(1).cast::<AtomicU64>() };
        let want = self.check(p, if owned { OWNED } else { LIVE });
        // Acquire on success: the header words written at allocation (possibly on another thread,
        // published to us through whatever handed us the pointer) are read below; AcqRel so a
        // racing free sees 0. Relaxed on failure: we only classify the refusal.
        match check.compare_exchange(want, 0, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => {}
            Err(cur) => {
                return Err(if cur == self.check(p, if owned { LIVE } else { OWNED }) {
                    Refused::Owned
                } else if cur == 0 {
                    Refused::Freed
                } else {
                    Refused::Unknown
                })
            }
        }
        // SAFETY: the check word matched, so these are the header words `alloc` wrote.
        let (base, node, size) = unsafe {
            (
                words.sub(4).read() as usize,
                words.sub(3).read() as *const PoolNode,
                words.sub(2).read(),
            )
        };
        Ok(Block { node, size, base })
    }

    /// Returns a block taken with [`TaskHeap::take`] to the heap.
    #[inline]
    pub(crate) fn release_block(&self, block: &Block) {
        // By size and the minimum header: a hint; `cached_alloc` checks the block fits.
        if let Some(slot) = slot_of((block.size as usize).saturating_add(HEADER)) {
            // Release: the block's memory goes to whoever takes it from the slot.
            let old = self.cache[slot]
                .0
                .swap(block.base as *mut u8, Ordering::AcqRel);
            if !old.is_null() {
                // SAFETY: a block of this heap that left the slot, referenced by nothing else.
                unsafe { mi::mi_free(old.cast()) };
            }
            return;
        }
        // SAFETY: `take` verified the block is a live block of this heap and marked it free, so
        // no other free of it gets here; `base` is what mi_heap_malloc[_aligned] returned, and
        // mi_free may be called from any thread.
        unsafe { mi::mi_free(block.base as *mut _) };
    }
}

impl Drop for TaskHeap {
    fn drop(&mut self) {
        if let Some(h) = self.heap.get() {
            if !h.0.is_null() {
                // SAFETY: `&mut self`: no other thread can allocate from or free into this heap
                // through this manager any more (see the module docs); mi_heap_destroy frees every
                // block still live in it.
                unsafe { mi::mi_heap_destroy(h.0) };
                // Relaxed: a read-out.
                LIVE_HEAPS.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(h: &TaskHeap) -> usize {
        h.cache
            .iter()
            .filter(|s| !s.0.load(Ordering::Relaxed).is_null())
            .count()
    }

    fn alloc_free(h: &TaskHeap, size: usize) -> usize {
        let p = h.alloc(std::ptr::null(), size, 16, false).unwrap();
        let block = h.take(p.as_ptr() as usize, false).ok().unwrap();
        h.release_block(&block);
        p.as_ptr() as usize
    }

    /// Blocks above mimalloc's largest size class are kept (one per shard) and handed to the next
    /// allocation that fits; smaller and larger ones go back to mimalloc at once.
    #[test]
    fn only_freed_blocks_between_512_kib_and_2_mib_are_kept_one_per_shard() {
        let h = TaskHeap::new();
        alloc_free(&h, 4096);
        alloc_free(&h, 400 << 10);
        alloc_free(&h, 3 << 20);
        assert_eq!(cached(&h), 0);
        alloc_free(&h, 1 << 20);
        assert_eq!(cached(&h), 1);
        // The kept block serves the next allocation of its size on the same shard (the thread
        // may move to the other shard's CPU in between, so it is allowed to miss once).
        let mut kept = 0;
        for _ in 0..20 {
            let p = h.alloc(std::ptr::null(), 1 << 20, 16, false).unwrap();
            kept += usize::from(cached(&h) == 0);
            let block = h.take(p.as_ptr() as usize, false).ok().unwrap();
            h.release_block(&block);
            assert!((1..=SHARDS).contains(&cached(&h)));
        }
        assert!(kept >= 19, "{kept} of 20 allocations took the kept block");
        // A kept block that does not fit (a 2 MiB request: more than a quarter would be wasted
        // the other way round, here too small) is freed, not handed out.
        let big = h.alloc(std::ptr::null(), 2 << 20, 16, false).unwrap();
        // SAFETY: the block has 2 MiB of usable bytes past the pointer.
        unsafe { big.as_ptr().add((2 << 20) - 1).write(1) };
    }
}
