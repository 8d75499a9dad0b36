//! # nativemem-handles: generation-checked handle tables
//!
//! How a Java `long` (or a C `uint64_t`) names a native object without ever being a pointer.
//! nativemem's own library names its managers, reservations, leases, pools and spillers this way;
//! an engine in its own library names *its* objects to Java the same way (through
//! `nativemem_client::handles`), so a closed or forged handle is an error, never a crash: the
//! raw-pointer handles that core-dumped Gluten and OpenDAL's bindings are what this replaces. A
//! table is plain data with no global state, so each library has its own tables.
//!
//! A handle packs three fields into the positive range of a `jlong`:
//!
//! ```text
//!  63  62      56 55                          24 23                 0
//! ┌───┬──────────┬──────────────────────────────┬────────────────────┐
//! │ 0 │ kind tag │ generation (32 bits, never 0)│ slot index (24 bits)│
//! └───┴──────────┴──────────────────────────────┴────────────────────┘
//! ```
//!
//! - the **slot index** picks an entry of the table (at most 2^24 live handles per table);
//! - the **generation** is bumped every time the slot is emptied, so a handle that outlives its
//!   object (closed, double-closed) no longer matches and is refused as *stale*; a generation the
//!   slot has not reached yet is refused as *unknown*;
//! - the **kind tag** (1..=127) is different per table, so a reservation handle passed where a
//!   manager handle is expected is refused instead of resolving to an unrelated object. The tags
//!   are split in two ranges (see [`kind`]): 1..=63 for nativemem's own tables, 64..=127 for the
//!   tables of engines, so an engine's handle handed to nativemem (or the reverse) is refused as
//!   the wrong kind too. An engine makes its tables with [`HandleTable::for_engine`].
//!
//! `0` is never a valid handle (the tag and the generation are never 0). A made-up value is
//! refused by one of the checks and never dereferenced.
//!
//! # Resolving without a lock: the protocol
//! Every process-wide table is shared by every task of an executor, so resolving a handle must
//! write to no cache line that another task's calls write too (a read lock is a write to the
//! lock word; an `Arc` clone of a shared object is a write to its count). A call resolves a
//! handle with [`HandleTable::pin`] and writes only to the *slot* of the object it names:
//!
//! ```text
//!  segments: [AtomicPtr; 19]   64, 128, 256, ... slots each; allocated once, never moved or freed
//!  slot (own 128-byte line):   state: AtomicU64 ─ generation:32 │ LIVE │ DRAINING │ WATCH │ pins:29
//!                              value: Option<Arc<T>>
//!
//!  pin(h)      CAS state: pins + 1, only if LIVE and the generation is h's      (one RMW, the slot's)
//!  release     state - 1; the last pin of a removed object takes the value out,
//!              drops it, and puts the slot on the free list                    (one RMW, the slot's)
//!  remove(h)   pin, clone the Arc, CAS: LIVE off, generation + 1, DRAINING if
//!              other pins remain; release                                      (rare: close paths)
//!  insert      under the table's allocation mutex (free list, new segments)    (rare: create paths)
//! ```
//!
//! - **Stale, forged, wrong kind**: decoding checks the tag; the slot is found by arithmetic on
//!   the index in segments that never move (a segment not allocated yet: unknown); the pin's CAS
//!   succeeds only if the slot is LIVE with the handle's generation. A removed slot's generation
//!   is bumped at removal, so the checks and the errors are the ones of the earlier locked table
//!   (`tests/proptest.rs` compares the two on random operation sequences).
//! - **Nothing freed under a call**: the value is taken out of a slot only by the release that
//!   brings a removed slot's pins to zero (or by `remove` when no pin is held), and a new pin is
//!   impossible once LIVE is off. Until the value is dropped the slot stays DRAINING, so
//!   [`HandleTable::in_flight`] still counts it: an owner waiting for its objects' calls (the
//!   provider's manager close) waits for that drop too.
//! - **Counting calls in flight** is the pin count itself: per object, on the object's own line.
//!   Two tasks' calls share no written line; two threads of one task share none either while
//!   each uses its own objects.
//! - **WATCH**: [`HandleTable::watch`] marks a slot with pins so that the release that ends
//!   them reports it ([`Pinned::release`] returns `true`): an owner that gave up waiting learns
//!   which release to finish its work after, without the release touching the owner.
//! - Orderings are `SeqCst` on the state word: the provider pairs a pin's increment with its
//!   read of a close flag (and the close's flag store with its read of the pins), a
//!   store-buffering (Dekker) pattern that needs a single total order. The model check of the
//!   protocol is `tests/loom.rs` (`RUSTFLAGS="--cfg loom"`).
//!
//! Entries are `Arc<T>`: [`HandleTable::get`] returns a clone (for objects used beyond one call)
//! and [`HandleTable::remove`] returns the table's object, so removing a handle never frees an
//! object another thread still uses; it is freed when the last clone is dropped. Freed slots are
//! reused first-in first-out, so the same slot (and thus the same index) comes back as late as
//! possible and generations advance slowly.

use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::ptr;
use std::sync::Arc;

mod sync;
use sync::{sc_order, AtomicPtr, AtomicU64, AtomicUsize, Mutex, Ordering, UnsafeCell};

#[cfg(test)]
mod reference;

/// A Java `long`: the type of every handle.
#[allow(non_camel_case_types)]
pub type jlong = i64;

/// Bits of the slot index.
const INDEX_BITS: u32 = 24;
/// Largest number of slots one table can have.
pub const MAX_SLOTS: usize = 1 << INDEX_BITS;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;
const GENERATION_SHIFT: u32 = INDEX_BITS;
const TAG_SHIFT: u32 = 56;

/// Slots of the first segment (2^FIRST_BITS); segment `k` has `FIRST << k`. Small under loom,
/// where every slot is a modelled object.
#[cfg(not(loom))]
const FIRST_BITS: u32 = 6;
#[cfg(loom)]
const FIRST_BITS: u32 = 1;
const FIRST: usize = 1 << FIRST_BITS;
/// Enough segments for `MAX_SLOTS`: `FIRST * (2^SEGMENTS - 1) >= 2^INDEX_BITS`.
const SEGMENTS: usize = (INDEX_BITS + 1 - FIRST_BITS) as usize;

// The slot's state word (see the module docs).
const STATE_GEN_SHIFT: u32 = 32;
const LIVE: u64 = 1 << 31;
const DRAINING: u64 = 1 << 30;
const WATCH: u64 = 1 << 29;
const PINS: u64 = WATCH - 1;

fn generation_of(state: u64) -> u32 {
    (state >> STATE_GEN_SHIFT) as u32
}

/// The generation after `g`; never 0: wrap-around skips it, so no issued handle has generation 0.
fn next_generation(g: u32) -> u32 {
    g.checked_add(1).unwrap_or(1)
}

fn state_word(generation: u32, flags: u64) -> u64 {
    (u64::from(generation) << STATE_GEN_SHIFT) | flags
}

/// Segment and offset of slot `index`.
fn locate(index: usize) -> (usize, usize) {
    let v = index + FIRST;
    let segment = (usize::BITS - 1 - v.leading_zeros() - FIRST_BITS) as usize;
    (segment, v - (FIRST << segment))
}

/// The kind tags of handle tables: which table a handle belongs to.
///
/// Tags are unique per table within a process. nativemem's own tables (in
/// `libnativemem_jni.so`) use [`LIBRARY`]; an engine in its own library uses [`ENGINE`] (through
/// [`HandleTable::for_engine`], which refuses any other tag), so a handle of an engine's table
/// passed to the engine ABI, e.g. as a pool, is refused as the wrong kind instead of naming one of
/// nativemem's objects, and the reverse.
pub mod kind {
    use std::ops::RangeInclusive;

    /// Tags of nativemem's own tables.
    pub const LIBRARY: RangeInclusive<u8> = 1..=63;
    /// Tags reserved for engines' own tables (an engine numbers its tables from [`ENGINE_FIRST`]).
    pub const ENGINE: RangeInclusive<u8> = ENGINE_FIRST..=ENGINE_LAST;
    /// The first tag of an engine's tables.
    pub const ENGINE_FIRST: u8 = 64;
    /// The last tag of an engine's tables.
    pub const ENGINE_LAST: u8 = 127;

    /// Memory managers (`NativeMemoryManager`, `nm_manager`).
    pub const MANAGER: u8 = 1;
    /// Reservations made from Java (the registry's).
    pub const RESERVATION: u8 = 2;
    // 3 is not used by nativemem's tables.
    /// Leases of the engine ABI (`nm_lease`).
    pub const LEASE: u8 = 4;
    /// Pool handles of the engine ABI (`nm_pool`).
    pub const POOL: u8 = 5;
    /// Registered spillers of the engine ABI (`nm_spiller`).
    pub const SPILLER: u8 = 6;
    /// Engine state attached to a manager (`nm_state`).
    pub const STATE: u8 = 7;
    /// Test-only objects of the JNI layer's `testing` feature.
    pub const TESTING: u8 = 63;
}

/// Why a handle was refused. Its `Display` names the handle in hex and the kind of object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandleError {
    /// The handle is `0`.
    Null {
        /// What kind of handle was expected, e.g. `memory manager`.
        kind: &'static str,
    },
    /// The handle belongs to another table (or is negative, or made up).
    WrongKind {
        /// The handle value.
        handle: jlong,
        /// What kind of handle was expected.
        kind: &'static str,
    },
    /// The handle names an object that was destroyed (closed) since.
    Stale {
        /// The handle value.
        handle: jlong,
        /// What kind of handle was expected.
        kind: &'static str,
    },
    /// The handle was never issued by this table (made up or corrupted).
    Unknown {
        /// The handle value.
        handle: jlong,
        /// What kind of handle was expected.
        kind: &'static str,
    },
    /// The table has no free slot ([`MAX_SLOTS`] live handles).
    Full {
        /// What kind of handle was asked for.
        kind: &'static str,
    },
}

impl fmt::Display for HandleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandleError::Null { kind } => write!(f, "null {kind} handle (0x0)"),
            HandleError::WrongKind { handle, kind } => {
                write!(f, "{:#018x} is not a {kind} handle", *handle as u64)
            }
            HandleError::Stale { handle, kind } => write!(
                f,
                "{kind} handle {:#018x} is stale: it was closed or destroyed",
                *handle as u64
            ),
            HandleError::Unknown { handle, kind } => write!(
                f,
                "{kind} handle {:#018x} is unknown: it was never issued by this process",
                *handle as u64
            ),
            HandleError::Full { kind } => write!(
                f,
                "too many live {kind} handles ({MAX_SLOTS}); close some before creating more"
            ),
        }
    }
}

impl std::error::Error for HandleError {}

/// One slot, on its own pair of cache lines (Intel's adjacent-line prefetch pairs 64-byte
/// lines), so pins of objects in neighbouring slots never share a written line.
#[repr(align(128))]
struct Slot<T> {
    /// generation | LIVE | DRAINING | WATCH | pins (see the module docs). The generation is the
    /// one of the live handle, or (not LIVE) the one the slot issues next.
    state: AtomicU64,
    /// `Some` while LIVE and while DRAINING; written only by the thread that owns the slot's
    /// transition (insert under the allocation mutex, or the reclaim with no pin left).
    value: UnsafeCell<Option<Arc<T>>>,
}

impl<T> Slot<T> {
    fn new() -> Self {
        Slot {
            state: AtomicU64::new(state_word(1, 0)),
            value: UnsafeCell::new(None),
        }
    }
}

/// What insert needs: the free list and the next never-used index.
struct Alloc {
    /// Indexes of empty slots, oldest first.
    free: VecDeque<u32>,
    /// Slots `0..next` have been used at least once.
    next: usize,
}

/// A table of `Arc<T>` named by generation-checked `jlong` handles. `Send + Sync`; every method
/// takes `&self`. Resolving a handle ([`pin`](Self::pin), [`get`](Self::get)) takes no lock and
/// writes only to the slot of the object (see the module docs); insert and the end of a removal
/// take a mutex of the table, never while calling out.
pub struct HandleTable<T> {
    tag: u8,
    kind: &'static str,
    /// Segment `k` holds `FIRST << k` slots; null until first needed, then never moved or freed
    /// while the table lives.
    segments: [AtomicPtr<Slot<T>>; SEGMENTS],
    live: AtomicUsize,
    alloc: Mutex<Alloc>,
    _owns: PhantomData<Arc<T>>,
}

impl<T> fmt::Debug for HandleTable<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandleTable")
            .field("kind", &self.kind)
            .field("tag", &self.tag)
            .field("live", &self.live())
            .finish()
    }
}

impl<T> Drop for HandleTable<T> {
    fn drop(&mut self) {
        for (k, segment) in self.segments.iter_mut().enumerate() {
            let p = segment.load(Ordering::Acquire);
            if !p.is_null() {
                // SAFETY: `p` came from `Box::into_raw` of a boxed slice of `FIRST << k` slots
                // (`segment`), and `&mut self` means no pin or other reference to it remains.
                drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(p, FIRST << k)) });
            }
        }
    }
}

impl<T> HandleTable<T> {
    /// An empty table whose handles carry `tag` (1..=127, unique per table in the process) and
    /// whose errors call the objects `kind` (e.g. `"memory manager"`).
    ///
    /// A tag outside 1..=127 is a programming error caught at compile time when used in a
    /// `static` (the `assert!` runs in const evaluation). nativemem's own tables use the tags of
    /// [`kind`]; an engine's table uses [`HandleTable::for_engine`].
    #[cfg(not(loom))]
    pub const fn new(tag: u8, kind: &'static str) -> Self {
        assert!(tag >= 1 && tag <= 127, "handle tag must be in 1..=127");
        HandleTable {
            tag,
            kind,
            segments: [const { AtomicPtr::new(ptr::null_mut()) }; SEGMENTS],
            live: AtomicUsize::new(0),
            alloc: Mutex::new(Alloc {
                free: VecDeque::new(),
                next: 0,
            }),
            _owns: PhantomData,
        }
    }

    /// As above, under loom (whose atomics are not `const`).
    #[cfg(loom)]
    pub fn new(tag: u8, kind: &'static str) -> Self {
        assert!((1..=127).contains(&tag), "handle tag must be in 1..=127");
        HandleTable {
            tag,
            kind,
            segments: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            live: AtomicUsize::new(0),
            alloc: Mutex::new(Alloc {
                free: VecDeque::new(),
                next: 0,
            }),
            _owns: PhantomData,
        }
    }

    /// A table of an engine's own objects: `tag` must be in [`kind::ENGINE`] (64..=127), the
    /// range nativemem's tables never use, so the engine's handles and nativemem's are refused as
    /// the wrong kind by each other's tables. Checked at compile time in a `static`:
    ///
    /// ```
    /// use nativemem_handles::{kind, HandleTable};
    /// static SORTERS: HandleTable<String> = HandleTable::for_engine(kind::ENGINE_FIRST, "sorter");
    /// # assert!(SORTERS.get(1).is_err());
    /// ```
    ///
    /// ```compile_fail
    /// use nativemem_handles::{kind, HandleTable};
    /// // A tag of nativemem's own range (here, its pools') is refused.
    /// static TASKS: HandleTable<String> = HandleTable::for_engine(kind::POOL, "task");
    /// ```
    #[cfg(not(loom))]
    pub const fn for_engine(tag: u8, kind: &'static str) -> Self {
        assert!(
            tag >= kind::ENGINE_FIRST && tag <= kind::ENGINE_LAST,
            "an engine's handle tag must be in 64..=127 (nativemem_handles::kind::ENGINE)"
        );
        Self::new(tag, kind)
    }

    /// Number of live handles.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    fn encode(&self, index: u32, generation: u32) -> jlong {
        let raw = (u64::from(self.tag) << TAG_SHIFT)
            | (u64::from(generation) << GENERATION_SHIFT)
            | u64::from(index);
        // The tag is at most 127, so bit 63 is 0 and the value is a positive jlong.
        raw as jlong
    }

    /// Splits a handle into (index, generation) if it carries this table's tag.
    fn decode(&self, handle: jlong) -> Result<(usize, u32), HandleError> {
        if handle == 0 {
            return Err(HandleError::Null { kind: self.kind });
        }
        let raw = handle as u64;
        if raw >> TAG_SHIFT != u64::from(self.tag) {
            return Err(HandleError::WrongKind {
                handle,
                kind: self.kind,
            });
        }
        let generation = ((raw >> GENERATION_SHIFT) & u64::from(u32::MAX)) as u32;
        let index = (raw & INDEX_MASK) as usize;
        Ok((index, generation))
    }

    /// True if `handle` carries this table's kind tag (live or not).
    pub fn owns(&self, handle: jlong) -> bool {
        self.decode(handle).is_ok()
    }

    /// The slot `index`, if its segment exists.
    #[inline]
    fn slot(&self, index: usize) -> Option<&Slot<T>> {
        let (segment, offset) = locate(index);
        // Acquire: pairs with the Release store that published the segment's initialised slots.
        let p = self.segments.get(segment)?.load(Ordering::Acquire);
        if p.is_null() {
            return None;
        }
        // SAFETY: a non-null segment pointer is a leaked boxed slice of `FIRST << segment` slots
        // that is freed only by `Drop` (which has `&mut self`), and `offset < FIRST << segment`
        // by construction of `locate`.
        Some(unsafe { &*p.add(offset) })
    }

    /// Allocates segment `segment` if it is missing. Called with the allocation mutex held.
    fn ensure_segment(&self, segment: usize) {
        if self.segments[segment].load(Ordering::Acquire).is_null() {
            let slots: Box<[Slot<T>]> = (0..FIRST << segment).map(|_| Slot::new()).collect();
            let p = Box::into_raw(slots).cast::<Slot<T>>();
            // Release: readers that see the pointer see initialised slots.
            self.segments[segment].store(p, Ordering::Release);
        }
    }

    /// Stores `value` and returns its new handle.
    pub fn insert(&self, value: Arc<T>) -> Result<jlong, HandleError> {
        let mut alloc = self.alloc.lock();
        let index = match alloc.free.pop_front() {
            Some(i) => i as usize,
            None => {
                if alloc.next >= MAX_SLOTS {
                    return Err(HandleError::Full { kind: self.kind });
                }
                let index = alloc.next;
                self.ensure_segment(locate(index).0);
                alloc.next += 1;
                index
            }
        };
        // The index came from the free list or was just allocated, so the slot exists; a miss
        // would be a bug of this table, reported rather than panicking across the JNI boundary.
        let Some(slot) = self.slot(index) else {
            return Err(HandleError::Full { kind: self.kind });
        };
        // A free slot is not LIVE, so no pin's CAS and no `watch` changes it: this load sees
        // the state its last reclaim (or `Slot::new`) stored.
        let generation = generation_of(slot.state.load(Ordering::SeqCst));
        // SAFETY: the slot is free (on the free list or never used): no pin exists (pins need
        // LIVE) and no reclaim runs (it ends before the slot is put on the free list, under this
        // mutex), so this thread is the only one to touch the value.
        slot.value.with_mut(|v| unsafe { *v = Some(value) });
        // SeqCst (at least Release): a pin that sees LIVE sees the value.
        slot.state
            .store(state_word(generation, LIVE), Ordering::SeqCst);
        self.live.fetch_add(1, Ordering::SeqCst);
        // `index < MAX_SLOTS = 2^24`, so it fits in u32.
        Ok(self.encode(index as u32, generation))
    }

    /// Pins the object named by `handle` for one call: until the [`Pinned`] is released (or
    /// dropped) the object is not freed, and [`in_flight`](Self::in_flight) counts the call.
    /// Lock-free; one read-modify-write of the slot's own state word.
    #[inline]
    pub fn pin(&self, handle: jlong) -> Result<Pinned<'_, T>, HandleError> {
        let (index, generation) = self.decode(handle)?;
        let slot = self.slot(index).ok_or(HandleError::Unknown {
            handle,
            kind: self.kind,
        })?;
        let mut state = slot.state.load(Ordering::Relaxed);
        loop {
            if state & LIVE == 0 || generation_of(state) != generation {
                return Err(self.mismatch(handle, generation_of(state), generation));
            }
            if state & PINS == PINS {
                return Err(HandleError::Full { kind: self.kind });
            }
            // SeqCst: the provider orders this increment before its read of a close flag, against
            // the close's store of that flag before its read of the pins (see the module docs).
            match slot.state.compare_exchange_weak(
                state,
                state + 1,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => state = actual,
            }
        }
        sc_order();
        // SAFETY: the pin holds the slot LIVE-or-DRAINING, during which the value is `Some` and
        // only read (it is written only by insert and the reclaim, which need no pin held).
        let object = slot
            .value
            .with(|v| unsafe { (*v).as_ref().map(Arc::as_ptr) });
        let pinned = Pinned {
            table: self,
            slot,
            index: index as u32,
            object: object.unwrap_or(ptr::null()),
        };
        if object.is_none() {
            // Unreachable by the protocol; refused rather than panicking across the ABI.
            drop(pinned);
            return Err(HandleError::Unknown {
                handle,
                kind: self.kind,
            });
        }
        Ok(pinned)
    }

    /// The object named by `handle` (a clone of the table's `Arc`), or why the handle is refused.
    /// Lock-free, like [`pin`](Self::pin); the clone is a write to the object's reference count.
    pub fn get(&self, handle: jlong) -> Result<Arc<T>, HandleError> {
        let pinned = self.pin(handle)?;
        let value = pinned.arc();
        pinned.release();
        Ok(value)
    }

    /// Removes the object named by `handle` and returns it (the caller drops it, outside any
    /// table lock). Every later use of `handle` is refused as stale; calls that pinned it before
    /// finish on it, and the table lets go of it when the last of them is released.
    pub fn remove(&self, handle: jlong) -> Result<Arc<T>, HandleError> {
        self.remove_counted(handle).map(|r| r.value)
    }

    /// [`remove`](Self::remove), also telling whether other calls still had the object pinned
    /// and whether a watched slot was released (see [`Removed`]).
    pub fn remove_counted(&self, handle: jlong) -> Result<Removed<T>, HandleError> {
        let pinned = self.pin(handle)?;
        let unlinked = pinned.unlink(handle);
        let watched = pinned.release();
        unlinked.map(|(value, others)| Removed {
            value,
            others_pinned: others,
            watched,
        })
    }

    /// Removes every object whose handle is in `handles` that is still live; returns them.
    pub fn remove_all(&self, handles: impl IntoIterator<Item = jlong>) -> Vec<Arc<T>> {
        handles
            .into_iter()
            .filter_map(|h| self.remove(h).ok())
            .collect()
    }

    /// Calls in flight on the object `handle` names: its pins while it is live, and while it is
    /// removed but not yet let go of (pins left, or its value being dropped: at least 1). 0 for
    /// a handle of this table in any other state, or of another table.
    pub fn in_flight(&self, handle: jlong) -> u64 {
        let Ok((index, generation)) = self.decode(handle) else {
            return 0;
        };
        sc_order();
        self.slot(index).map_or(0, |slot| {
            busy(slot.state.load(Ordering::SeqCst), generation)
        })
    }

    /// Marks the slot of `handle` WATCH if calls are in flight on it ([`in_flight`](Self::in_flight)
    /// > 0): the release that ends them returns `true`. Returns whether it marked.
    pub fn watch(&self, handle: jlong) -> bool {
        let Ok((index, generation)) = self.decode(handle) else {
            return false;
        };
        let Some(slot) = self.slot(index) else {
            return false;
        };
        sc_order();
        let mut state = slot.state.load(Ordering::SeqCst);
        loop {
            if busy(state, generation) == 0 {
                return false;
            }
            match slot.state.compare_exchange_weak(
                state,
                state | WATCH,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(actual) => state = actual,
            }
        }
    }

    /// Ends a reclaim: the slot is free again (its generation already bumped by the removal) and
    /// goes to the back of the free list. Returns whether the slot was watched.
    fn finish_reclaim(&self, slot: &Slot<T>, index: u32) -> bool {
        let mut alloc = self.alloc.lock();
        let state = slot.state.load(Ordering::SeqCst);
        let prev = slot
            .state
            .swap(state_word(generation_of(state), 0), Ordering::SeqCst);
        alloc.free.push_back(index);
        prev & WATCH != 0
    }

    /// A generation mismatch. The slot's generation only grows (until it wraps after 2^32
    /// reuses of the slot), so an older generation was issued and destroyed since; a newer one, or
    /// 0, was never issued.
    fn mismatch(&self, handle: jlong, current: u32, asked: u32) -> HandleError {
        if asked != 0 && asked < current {
            HandleError::Stale {
                handle,
                kind: self.kind,
            }
        } else {
            HandleError::Unknown {
                handle,
                kind: self.kind,
            }
        }
    }

    /// Test hook: sets the generation of slot `index` (which must exist), keeping its flags.
    #[cfg(test)]
    fn set_generation(&self, index: usize, generation: u32) {
        let slot = self.slot(index).expect("slot exists");
        let state = slot.state.load(Ordering::SeqCst);
        slot.state.store(
            state_word(
                generation,
                state & !(u64::from(u32::MAX) << STATE_GEN_SHIFT),
            ),
            Ordering::SeqCst,
        );
    }

    /// Test hook: the generation slot `index` issues or holds.
    #[cfg(test)]
    fn generation(&self, index: usize) -> u32 {
        generation_of(
            self.slot(index)
                .expect("slot exists")
                .state
                .load(Ordering::SeqCst),
        )
    }
}

/// Calls in flight that `state` shows for a handle of generation `generation` (see
/// [`HandleTable::in_flight`]).
fn busy(state: u64, generation: u32) -> u64 {
    let pins = state & PINS;
    if state & LIVE != 0 {
        if generation_of(state) == generation {
            pins
        } else {
            0
        }
    } else if state & DRAINING != 0 && generation_of(state) == next_generation(generation) {
        pins.max(1)
    } else {
        0
    }
}

/// What [`HandleTable::remove_counted`] removed.
#[derive(Debug)]
pub struct Removed<T> {
    /// The table's object.
    pub value: Arc<T>,
    /// Other calls had the object pinned at the removal: they finish on it, and the slot counts
    /// in [`HandleTable::in_flight`] until they are released.
    pub others_pinned: bool,
    /// The removal's own pin was the release of a watched slot (see [`HandleTable::watch`]).
    pub watched: bool,
}

/// One call's pin of an object (see [`HandleTable::pin`]). Derefs to the object. Release it with
/// [`release`](Pinned::release) to learn whether the slot was watched, or drop it.
pub struct Pinned<'t, T> {
    table: &'t HandleTable<T>,
    slot: &'t Slot<T>,
    index: u32,
    /// The object; alive while the pin holds the slot (the value is not taken out before).
    object: *const T,
}

impl<T> std::ops::Deref for Pinned<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: `object` points into the `Arc` the slot holds; the slot keeps its value while
        // a pin is held (module docs), so the `Arc` and its object outlive this borrow.
        unsafe { &*self.object }
    }
}

impl<T: fmt::Debug> fmt::Debug for Pinned<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pinned").field(&**self).finish()
    }
}

impl<T> Pinned<'_, T> {
    /// A clone of the table's `Arc` of the object.
    pub fn arc(&self) -> Arc<T> {
        // SAFETY: as in `deref`: the pin keeps the slot's value `Some`; the value is only read.
        let value = self.slot.value.with(|v| unsafe { (*v).clone() });
        match value {
            Some(v) => v,
            // The pin guarantees `Some`; rebuilt from the pointer rather than panicking.
            None => {
                // SAFETY: unreachable by the protocol; `object` came from `Arc::as_ptr` of the
                // table's `Arc`, which the pin keeps alive, so a strong count can be added.
                unsafe {
                    Arc::increment_strong_count(self.object);
                    Arc::from_raw(self.object)
                }
            }
        }
    }

    /// Marks the slot WATCH (this pin is in flight): the release that ends the slot's pins
    /// returns `true`.
    pub fn watch(&self) {
        self.slot.state.fetch_or(WATCH, Ordering::SeqCst);
        sc_order();
    }

    /// Calls in flight on the slot, this one included.
    pub fn pins(&self) -> u64 {
        self.slot.state.load(Ordering::SeqCst) & PINS
    }

    /// Removes the pinned object from the table (its handle goes stale) and returns the table's
    /// `Arc` and whether other pins were held. The slot is let go of when the last pin — at
    /// least this one — is released. Fails if another thread removed it first.
    pub fn unlink(&self, handle: jlong) -> Result<(Arc<T>, bool), HandleError> {
        let value = self.arc();
        let mut state = self.slot.state.load(Ordering::SeqCst);
        loop {
            if state & LIVE == 0 {
                let (_, asked) = self.table.decode(handle)?;
                return Err(self.table.mismatch(handle, generation_of(state), asked));
            }
            let next = state_word(
                next_generation(generation_of(state)),
                (state & (WATCH | PINS)) | DRAINING,
            );
            match self.slot.state.compare_exchange_weak(
                state,
                next,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => break,
                Err(actual) => state = actual,
            }
        }
        self.table.live.fetch_sub(1, Ordering::SeqCst);
        Ok((value, state & PINS > 1))
    }

    /// Ends the pin. The last pin of a removed object takes the table's `Arc` out and drops it
    /// (which may drop the object, on this thread, with no lock held) before the slot is free.
    /// Returns `true` if the slot was watched ([`HandleTable::watch`]).
    pub fn release(self) -> bool {
        let this = std::mem::ManuallyDrop::new(self);
        this.release_inner()
    }

    fn release_inner(&self) -> bool {
        let prev = self.slot.state.fetch_sub(1, Ordering::SeqCst);
        sc_order();
        let mut watched = prev & WATCH != 0;
        if prev & (LIVE | DRAINING) == DRAINING && prev & PINS == 1 {
            // The last pin of a removed object: no other pin exists and none can start (not
            // LIVE), so this thread owns the slot until `finish_reclaim` frees it.
            // SAFETY: exclusive access (just above); readers only read the value under a pin.
            let value = self.slot.value.with_mut(|v| unsafe { (*v).take() });
            drop(value);
            watched |= self.table.finish_reclaim(self.slot, self.index);
        }
        watched
    }
}

impl<T> Drop for Pinned<'_, T> {
    fn drop(&mut self) {
        self.release_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn table() -> HandleTable<u64> {
        HandleTable::new(kind::POOL, "thing")
    }

    #[test]
    fn insert_get_remove_round_trip() {
        let t = table();
        let h = t.insert(Arc::new(42)).unwrap();
        assert!(h > 0, "handles are positive");
        assert_eq!(*t.get(h).unwrap(), 42);
        assert_eq!(t.live(), 1);
        assert_eq!(*t.remove(h).unwrap(), 42);
        assert_eq!(t.live(), 0);
    }

    #[test]
    fn handle_layout_carries_tag_generation_and_index() {
        let t = table();
        let h = t.insert(Arc::new(1)).unwrap() as u64;
        assert_eq!(h >> 56, 5);
        assert_eq!((h >> 24) & 0xffff_ffff, 1);
        assert_eq!(h & 0xff_ffff, 0);
        let h2 = t.insert(Arc::new(2)).unwrap() as u64;
        assert_eq!(h2 & 0xff_ffff, 1);
    }

    #[test]
    fn removed_handle_is_stale_and_double_remove_is_refused() {
        let t = table();
        let h = t.insert(Arc::new(1)).unwrap();
        t.remove(h).unwrap();
        assert_eq!(
            t.get(h).unwrap_err(),
            HandleError::Stale {
                handle: h,
                kind: "thing"
            }
        );
        assert_eq!(
            t.remove(h).unwrap_err(),
            HandleError::Stale {
                handle: h,
                kind: "thing"
            }
        );
        let msg = t.get(h).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "thing handle {:#018x} is stale: it was closed or destroyed",
                h as u64
            )
        );
    }

    #[test]
    fn reused_slot_gets_a_new_generation() {
        let t = table();
        let h1 = t.insert(Arc::new(1)).unwrap();
        t.remove(h1).unwrap();
        let h2 = t.insert(Arc::new(2)).unwrap();
        assert_eq!(h1 as u64 & 0xff_ffff, h2 as u64 & 0xff_ffff, "same slot");
        assert_ne!(h1, h2);
        assert_eq!(*t.get(h2).unwrap(), 2);
        assert!(matches!(t.get(h1), Err(HandleError::Stale { .. })));
        // Removing through the stale handle must not remove the new object.
        assert!(t.remove(h1).is_err());
        assert_eq!(*t.get(h2).unwrap(), 2);
    }

    #[test]
    fn free_slots_are_reused_oldest_first() {
        let t = table();
        let a = t.insert(Arc::new(1)).unwrap();
        let b = t.insert(Arc::new(2)).unwrap();
        t.remove(a).unwrap();
        t.remove(b).unwrap();
        let c = t.insert(Arc::new(3)).unwrap();
        assert_eq!(c as u64 & 0xff_ffff, a as u64 & 0xff_ffff);
        let d = t.insert(Arc::new(4)).unwrap();
        assert_eq!(d as u64 & 0xff_ffff, b as u64 & 0xff_ffff);
    }

    #[test]
    fn forged_handles_are_refused() {
        let t = table();
        let h = t.insert(Arc::new(1)).unwrap();
        let cases: Vec<(jlong, &str)> = vec![
            (0, "null thing handle (0x0)"),
            (-1, "is not a thing handle"),
            (1, "is not a thing handle"),
            (0x1234_5678, "is not a thing handle"),
            (i64::MAX, "is not a thing handle"),
            ((6i64 << 56) | (1 << 24), "is not a thing handle"),
            // Right tag, slot never allocated.
            ((5i64 << 56) | (1 << 24) | 999, "is unknown"),
            // Right tag and slot, generation from the future.
            (h + (7 << 24), "is unknown"),
            // Right tag and slot, generation 0 (never issued).
            (h & !(0xffff_ffffi64 << 24), "is unknown"),
        ];
        for (forged, want) in cases {
            let err = t.get(forged).unwrap_err();
            assert!(
                err.to_string().contains(want),
                "{forged:#x}: {err} should contain {want:?}"
            );
            assert!(t.remove(forged).is_err(), "{forged:#x} removed something");
        }
        assert_eq!(*t.get(h).unwrap(), 1, "the real handle still works");
        assert_eq!(t.live(), 1);
    }

    #[test]
    fn handle_of_another_table_is_the_wrong_kind() {
        let a: HandleTable<u64> = HandleTable::new(kind::MANAGER, "manager");
        let b: HandleTable<u64> = HandleTable::new(kind::RESERVATION, "reservation");
        let ha = a.insert(Arc::new(1)).unwrap();
        let hb = b.insert(Arc::new(2)).unwrap();
        assert!(matches!(b.get(ha), Err(HandleError::WrongKind { .. })));
        assert!(matches!(a.get(hb), Err(HandleError::WrongKind { .. })));
        assert_eq!(
            a.get(hb).unwrap_err().to_string(),
            format!("{:#018x} is not a manager handle", hb as u64)
        );
    }

    #[test]
    fn an_engine_handle_is_the_wrong_kind_for_every_library_table() {
        let engine: HandleTable<u64> = HandleTable::for_engine(kind::ENGINE_FIRST, "task");
        let h = engine.insert(Arc::new(1)).unwrap();
        for tag in kind::LIBRARY {
            let t: HandleTable<u64> = HandleTable::new(tag, "pool");
            assert!(matches!(t.get(h), Err(HandleError::WrongKind { .. })));
        }
        let last: HandleTable<u64> = HandleTable::for_engine(kind::ENGINE_LAST, "last");
        assert!(
            last.insert(Arc::new(2)).unwrap() > 0,
            "tag 127 keeps handles positive"
        );
    }

    #[test]
    #[should_panic(expected = "64..=127")]
    fn an_engine_table_refuses_a_library_tag() {
        let _ = HandleTable::<u64>::for_engine(kind::POOL, "task");
    }

    #[test]
    fn removing_does_not_free_an_object_in_use() {
        let t: HandleTable<String> = HandleTable::new(kind::STATE, "s");
        let h = t.insert(Arc::new("alive".to_string())).unwrap();
        let in_use = t.get(h).unwrap();
        let removed = t.remove(h).unwrap();
        drop(removed);
        assert_eq!(in_use.as_str(), "alive");
        assert_eq!(Arc::strong_count(&in_use), 1);
    }

    #[test]
    fn remove_all_skips_dead_handles() {
        let t = table();
        let a = t.insert(Arc::new(1)).unwrap();
        let b = t.insert(Arc::new(2)).unwrap();
        t.remove(a).unwrap();
        let got = t.remove_all([a, b, 0, -5]);
        assert_eq!(got.len(), 1);
        assert_eq!(*got[0], 2);
        assert_eq!(t.live(), 0);
    }

    #[test]
    fn generation_wraps_without_reaching_zero() {
        let t = table();
        let h = t.insert(Arc::new(1)).unwrap();
        t.set_generation(0, u32::MAX);
        // The handle no longer matches its slot: the slot moved on.
        assert!(t.get(h).is_err());
        let fresh = {
            let gen = t.generation(0);
            t.encode(0, gen)
        };
        t.remove(fresh).unwrap();
        assert_eq!(t.generation(0), 1);
        let again = t.insert(Arc::new(9)).unwrap();
        assert_eq!((again as u64 >> 24) & 0xffff_ffff, 1);
    }

    #[test]
    fn concurrent_insert_get_remove_keep_handles_unique_and_exact() {
        let t = Arc::new(HandleTable::<(usize, usize)>::new(9, "pair"));
        let mismatches = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|tid| {
                let t = t.clone();
                let mismatches = mismatches.clone();
                std::thread::spawn(move || {
                    let mut issued = Vec::new();
                    for i in 0..2000 {
                        let h = t.insert(Arc::new((tid, i))).unwrap();
                        issued.push(h);
                        if *t.get(h).unwrap() != (tid, i) {
                            mismatches.fetch_add(1, Ordering::SeqCst);
                        }
                        if i % 3 != 0 {
                            let v = t.remove(h).unwrap();
                            if *v != (tid, i) {
                                mismatches.fetch_add(1, Ordering::SeqCst);
                            }
                            // Stale right after removal, even while others reuse the slot.
                            if t.get(h).map(|v| *v == (tid, i)).unwrap_or(false) {
                                mismatches.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                    issued
                })
            })
            .collect();
        let mut all = HashSet::new();
        for th in threads {
            for h in th.join().unwrap() {
                assert!(all.insert(h), "handle {h:#x} issued twice");
            }
        }
        assert_eq!(mismatches.load(Ordering::SeqCst), 0);
        // Every third insert stays live.
        assert_eq!(t.live(), 8 * 667);
    }

    #[test]
    fn concurrent_removers_remove_once() {
        let t = Arc::new(table());
        for round in 0..200u64 {
            let h = t.insert(Arc::new(round)).unwrap();
            let wins = Arc::new(AtomicUsize::new(0));
            let ths: Vec<_> = (0..4)
                .map(|_| {
                    let t = t.clone();
                    let wins = wins.clone();
                    std::thread::spawn(move || {
                        if t.remove(h).is_ok() {
                            wins.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                })
                .collect();
            for th in ths {
                th.join().unwrap();
            }
            assert_eq!(wins.load(Ordering::SeqCst), 1, "round {round}");
        }
        assert_eq!(t.live(), 0);
    }
    /// An object counts its drops, to check that the table drops it once and never under a pin.
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_pinned_object_outlives_its_removal_and_the_last_release_lets_go() {
        let t: HandleTable<Counted> = HandleTable::new(kind::STATE, "s");
        let drops = Arc::new(AtomicUsize::new(0));
        let h = t.insert(Arc::new(Counted(drops.clone()))).unwrap();
        let a = t.pin(h).unwrap();
        let b = t.pin(h).unwrap();
        assert_eq!(t.in_flight(h), 2);
        let removed = t.remove_counted(h).unwrap();
        assert!(removed.others_pinned);
        assert!(!removed.watched);
        drop(removed);
        assert_eq!(t.live(), 0);
        assert!(matches!(t.pin(h), Err(HandleError::Stale { .. })));
        assert!(matches!(t.get(h), Err(HandleError::Stale { .. })));
        assert_eq!(drops.load(Ordering::SeqCst), 0, "dropped under a pin");
        assert_eq!(t.in_flight(h), 2, "removed, still in flight");
        assert!(!a.release());
        assert_eq!(t.in_flight(h), 1);
        // The slot is not reused while a pin holds it.
        let other = t
            .insert(Arc::new(Counted(Arc::new(AtomicUsize::new(0)))))
            .unwrap();
        assert_ne!(other as u64 & 0xff_ffff, h as u64 & 0xff_ffff);
        assert!(!b.release());
        assert_eq!(
            drops.load(Ordering::SeqCst),
            1,
            "the last release dropped it"
        );
        assert_eq!(t.in_flight(h), 0);
        // Now the slot is free again (after `other`'s would-be successors: FIFO).
        let again = t
            .insert(Arc::new(Counted(Arc::new(AtomicUsize::new(0)))))
            .unwrap();
        assert_eq!(again as u64 & 0xff_ffff, h as u64 & 0xff_ffff);
        assert_eq!(
            t.in_flight(h),
            0,
            "the new object's pins are not the old handle's"
        );
        let _p = t.pin(again).unwrap();
        assert_eq!(t.in_flight(h), 0);
        assert_eq!(t.in_flight(again), 1);
    }

    #[test]
    fn watch_marks_only_a_busy_slot_and_the_ending_release_reports_it() {
        let t = table();
        let h = t.insert(Arc::new(5)).unwrap();
        assert!(!t.watch(h), "nothing in flight: nothing to watch");
        let p = t.pin(h).unwrap();
        let q = t.pin(h).unwrap();
        assert!(t.watch(h));
        assert!(p.release(), "a release of a watched slot reports it");
        assert!(q.release());
        // A removal releases the watched slot too.
        let p = t.pin(h).unwrap();
        p.watch();
        let removed = t.remove_counted(h).unwrap();
        assert!(removed.others_pinned && removed.watched);
        assert!(p.release(), "the last release (the reclaim) reports it");
        assert_eq!(t.in_flight(h), 0);
        // A reclaimed slot is no longer watched.
        let h2 = t.insert(Arc::new(6)).unwrap();
        assert!(!t.pin(h2).unwrap().release());
    }

    #[test]
    fn pins_and_in_flight_refuse_foreign_handles() {
        let t = table();
        let h = t.insert(Arc::new(1)).unwrap();
        let other: HandleTable<u64> = HandleTable::new(kind::LEASE, "lease");
        let ho = other.insert(Arc::new(2)).unwrap();
        let _p = other.pin(ho).unwrap();
        assert!(matches!(t.pin(ho), Err(HandleError::WrongKind { .. })));
        assert_eq!(t.in_flight(ho), 0);
        assert!(!t.watch(ho));
        assert!(matches!(t.pin(0), Err(HandleError::Null { .. })));
        assert_eq!(*t.pin(h).unwrap(), 1);
    }

    #[test]
    fn slots_of_later_segments_resolve() {
        let t = table();
        let handles: Vec<jlong> = (0..1000u64)
            .map(|i| t.insert(Arc::new(i)).unwrap())
            .collect();
        for (i, h) in handles.iter().enumerate() {
            assert_eq!(*t.pin(*h).unwrap(), i as u64);
            assert_eq!(*h as u64 & 0xff_ffff, i as u64);
        }
        for (k, segment) in t.segments.iter().enumerate() {
            let allocated = !segment.load(Ordering::SeqCst).is_null();
            assert_eq!(allocated, (FIRST << k) - FIRST < 1000, "segment {k}");
        }
        // Unallocated segments: unknown, not a crash.
        let far = (5i64 << 56) | (1 << 24) | 0xff_fff0;
        assert!(matches!(t.pin(far), Err(HandleError::Unknown { .. })));
    }

    #[test]
    fn locate_covers_every_index_once() {
        let mut expected = (0usize, 0usize);
        for index in 0..(FIRST << 4) {
            assert_eq!(locate(index), expected, "index {index}");
            expected.1 += 1;
            if expected.1 == FIRST << expected.0 {
                expected = (expected.0 + 1, 0);
            }
        }
        let (segment, offset) = locate(MAX_SLOTS - 1);
        assert!(segment < SEGMENTS && offset < FIRST << segment);
    }

    #[test]
    fn concurrent_pins_and_removes_never_free_under_a_pin() {
        let t: Arc<HandleTable<Counted>> = Arc::new(HandleTable::new(kind::STATE, "s"));
        for _ in 0..200 {
            let drops = Arc::new(AtomicUsize::new(0));
            let h = t.insert(Arc::new(Counted(drops.clone()))).unwrap();
            let users: Vec<_> = (0..3)
                .map(|_| {
                    let t = t.clone();
                    let drops = drops.clone();
                    std::thread::spawn(move || {
                        while let Ok(p) = t.pin(h) {
                            assert_eq!(drops.load(Ordering::SeqCst), 0, "freed under a pin");
                            let _ = &p.0;
                            drop(p);
                        }
                    })
                })
                .collect();
            std::thread::yield_now();
            drop(t.remove(h).unwrap());
            for u in users {
                u.join().unwrap();
            }
            assert_eq!(drops.load(Ordering::SeqCst), 1);
            assert_eq!(t.in_flight(h), 0);
        }
        assert_eq!(t.live(), 0);
    }

    mod against_the_locked_table {
        use super::super::reference::LockedTable;
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Op {
            Insert,
            /// Get / pin / remove the handle issued `n`-th (modulo the issued count).
            Get(usize),
            Pin(usize),
            Remove(usize),
            /// A made-up handle.
            Forged(i64),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => Just(Op::Insert),
                3 => any::<usize>().prop_map(Op::Get),
                2 => any::<usize>().prop_map(Op::Pin),
                3 => any::<usize>().prop_map(Op::Remove),
                1 => any::<i64>().prop_map(Op::Forged),
            ]
        }

        proptest! {
            /// The lock-free table issues the same handles, resolves and refuses the same ones
            /// with the same errors, and counts the same live objects as the locked table it
            /// replaced, for any sequence of operations (inserts, gets, pins, removes and made-up handles).
            #[test]
            fn same_answers_as_the_locked_table(ops in proptest::collection::vec(op(), 1..200)) {
                let new = table();
                let old: LockedTable<u64> = LockedTable::new(kind::POOL, "thing");
                let mut issued: Vec<jlong> = Vec::new();
                let mut value = 0u64;
                for op in ops {
                    match op {
                        Op::Insert => {
                            value += 1;
                            let a = new.insert(Arc::new(value));
                            let b = old.insert(Arc::new(value));
                            prop_assert_eq!(&a, &b);
                            issued.push(a.unwrap());
                        }
                        Op::Get(n) | Op::Pin(n) | Op::Remove(n) if issued.is_empty() => {
                            let _ = n;
                        }
                        Op::Get(n) => {
                            let h = issued[n % issued.len()];
                            prop_assert_eq!(new.get(h).map(|v| *v), old.get(h).map(|v| *v));
                        }
                        Op::Pin(n) => {
                            let h = issued[n % issued.len()];
                            let pinned = new.pin(h).map(|p| *p);
                            prop_assert_eq!(pinned, old.get(h).map(|v| *v));
                        }
                        Op::Remove(n) => {
                            let h = issued[n % issued.len()];
                            prop_assert_eq!(new.remove(h).map(|v| *v), old.remove(h).map(|v| *v));
                        }
                        Op::Forged(h) => {
                            prop_assert_eq!(new.get(h).map(|v| *v), old.get(h).map(|v| *v));
                            prop_assert_eq!(new.remove(h).map(|v| *v), old.remove(h).map(|v| *v));
                        }
                    }
                    prop_assert_eq!(new.live(), old.live());
                }
            }
        }
    }
}
