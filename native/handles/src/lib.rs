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
//! refused by one of the checks and never dereferenced: resolving a handle is a bounds-checked
//! `Vec` lookup plus a comparison, under a read lock held only for that and an `Arc` clone.
//!
//! Entries are `Arc<T>`: a call resolves the handle to a clone and works on it without the table
//! lock, so removing a handle never frees an object another thread is using; it is freed when the
//! last clone is dropped. Freed slots are reused first-in first-out, so the same slot (and thus the
//! same index) comes back as late as possible and generations advance slowly.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

/// A Java `long`: the type of every handle.
#[allow(non_camel_case_types)]
pub type jlong = i64;

use parking_lot::RwLock;

/// Bits of the slot index.
const INDEX_BITS: u32 = 24;
/// Largest number of slots one table can have.
pub const MAX_SLOTS: usize = 1 << INDEX_BITS;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;
const GENERATION_SHIFT: u32 = INDEX_BITS;
const TAG_SHIFT: u32 = 56;

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

struct Slot<T> {
    /// Generation of the handle that names (or will next name) this slot; never 0.
    generation: u32,
    value: Option<Arc<T>>,
}

struct Slots<T> {
    slots: Vec<Slot<T>>,
    /// Indexes of empty slots, oldest first.
    free: VecDeque<u32>,
    live: usize,
}

/// A table of `Arc<T>` named by generation-checked `jlong` handles. `Send + Sync`; every method
/// takes `&self` and holds the table lock only for a lookup, never while calling out.
pub struct HandleTable<T> {
    tag: u8,
    kind: &'static str,
    inner: RwLock<Slots<T>>,
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

impl<T> HandleTable<T> {
    /// An empty table whose handles carry `tag` (1..=127, unique per table in the process) and
    /// whose errors call the objects `kind` (e.g. `"memory manager"`).
    ///
    /// A tag outside 1..=127 is a programming error caught at compile time when used in a
    /// `static` (the `assert!` runs in const evaluation). nativemem's own tables use the tags of
    /// [`kind`]; an engine's table uses [`HandleTable::for_engine`].
    pub const fn new(tag: u8, kind: &'static str) -> Self {
        assert!(tag >= 1 && tag <= 127, "handle tag must be in 1..=127");
        HandleTable {
            tag,
            kind,
            inner: RwLock::new(Slots {
                slots: Vec::new(),
                free: VecDeque::new(),
                live: 0,
            }),
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
    pub const fn for_engine(tag: u8, kind: &'static str) -> Self {
        assert!(
            tag >= kind::ENGINE_FIRST && tag <= kind::ENGINE_LAST,
            "an engine's handle tag must be in 64..=127 (nativemem_handles::kind::ENGINE)"
        );
        Self::new(tag, kind)
    }

    /// Number of live handles.
    pub fn live(&self) -> usize {
        self.inner.read().live
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

    /// Stores `value` and returns its new handle.
    pub fn insert(&self, value: Arc<T>) -> Result<jlong, HandleError> {
        let mut t = self.inner.write();
        let index = match t.free.pop_front() {
            Some(i) => i as usize,
            None => {
                if t.slots.len() >= MAX_SLOTS {
                    return Err(HandleError::Full { kind: self.kind });
                }
                t.slots.push(Slot {
                    generation: 1,
                    value: None,
                });
                t.slots.len() - 1
            }
        };
        // The index came from the free list or was just pushed, so the slot exists; a miss
        // would be a bug of this table, reported rather than panicking across the JNI boundary.
        let Some(slot) = t.slots.get_mut(index) else {
            return Err(HandleError::Full { kind: self.kind });
        };
        slot.value = Some(value);
        let generation = slot.generation;
        t.live += 1;
        // `index < MAX_SLOTS = 2^24`, so it fits in u32.
        Ok(self.encode(index as u32, generation))
    }

    /// The object named by `handle`, or why the handle is refused.
    pub fn get(&self, handle: jlong) -> Result<Arc<T>, HandleError> {
        let (index, generation) = self.decode(handle)?;
        let t = self.inner.read();
        let slot = t.slots.get(index).ok_or(HandleError::Unknown {
            handle,
            kind: self.kind,
        })?;
        match &slot.value {
            Some(v) if slot.generation == generation => Ok(v.clone()),
            _ => Err(self.mismatch(handle, slot.generation, generation)),
        }
    }

    /// Removes the object named by `handle` and returns it (the caller drops it, outside the
    /// table lock). Every later use of `handle` is refused as stale.
    pub fn remove(&self, handle: jlong) -> Result<Arc<T>, HandleError> {
        let (index, generation) = self.decode(handle)?;
        let mut t = self.inner.write();
        let slot = t.slots.get_mut(index).ok_or(HandleError::Unknown {
            handle,
            kind: self.kind,
        })?;
        let current = slot.generation;
        let value = match slot.value.take() {
            Some(v) if current == generation => v,
            other => {
                slot.value = other;
                return Err(self.mismatch(handle, current, generation));
            }
        };
        // Never 0: wrap-around skips it, so no issued handle has generation 0.
        slot.generation = current.checked_add(1).unwrap_or(1);
        t.free.push_back(index as u32);
        t.live -= 1;
        Ok(value)
    }

    /// Removes every object whose handle is in `handles` that is still live; returns them.
    pub fn remove_all(&self, handles: impl IntoIterator<Item = jlong>) -> Vec<Arc<T>> {
        handles
            .into_iter()
            .filter_map(|h| self.remove(h).ok())
            .collect()
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
        t.inner.write().slots[0].generation = u32::MAX;
        // The handle no longer matches its slot: the slot moved on.
        assert!(t.get(h).is_err());
        let fresh = {
            let gen = t.inner.read().slots[0].generation;
            t.encode(0, gen)
        };
        t.remove(fresh).unwrap();
        assert_eq!(t.inner.read().slots[0].generation, 1);
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
}
