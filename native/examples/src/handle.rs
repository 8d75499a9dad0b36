//! A generation-checked handle table: how a Java `long` names a sorter of this library without
//! ever being a pointer (the same scheme as nativemem's own tables, written again here because this
//! library links nothing of nativemem but the engine ABI).
//!
//! ```text
//!  63  62      56 55                          24 23                 0
//! ┌───┬──────────┬──────────────────────────────┬────────────────────┐
//! │ 0 │ kind tag │ generation (32 bits, never 0)│ slot index (24 bits)│
//! └───┴──────────┴──────────────────────────────┴────────────────────┘
//! ```
//!
//! - the **slot index** picks an entry (at most 2^24 live handles);
//! - the **generation** is bumped every time the slot is emptied, so a handle that outlives its
//!   object (closed, closed twice) no longer matches and is refused as *stale*; a generation the
//!   slot has not reached yet is refused as *unknown*;
//! - the **kind tag** (1..=127) tells this table's handles from others (a manager handle passed as
//!   a sorter handle is refused as *not a sorter handle*).
//!
//! `0` is never a valid handle. A made-up value is refused by one of the checks and never
//! dereferenced: resolving is a bounds-checked `Vec` lookup plus a comparison, under a read lock
//! held only for that and an `Arc` clone. Entries are `Arc<T>`: removing a handle never frees an
//! object another thread is using. Freed slots are reused first-in first-out.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;

const INDEX_BITS: u32 = 24;
const MAX_SLOTS: usize = 1 << INDEX_BITS;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;
const GENERATION_SHIFT: u32 = INDEX_BITS;
const TAG_SHIFT: u32 = 56;

/// Why a handle was refused. Its `Display` names the handle in hex and the kind of object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HandleError {
    /// The handle is `0`.
    Null { kind: &'static str },
    /// The handle belongs to another table (or is negative, or made up).
    WrongKind { handle: i64, kind: &'static str },
    /// The handle names an object that was closed since.
    Stale { handle: i64, kind: &'static str },
    /// The handle was never issued by this table.
    Unknown { handle: i64, kind: &'static str },
    /// The table has no free slot.
    Full { kind: &'static str },
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

/// A table of `Arc<T>` named by generation-checked `i64` handles. `Send + Sync`; the lock is held
/// only for a lookup, never while calling out.
pub(crate) struct HandleTable<T> {
    tag: u8,
    kind: &'static str,
    inner: RwLock<Slots<T>>,
}

impl<T> HandleTable<T> {
    /// An empty table whose handles carry `tag` (1..=127) and whose errors call the objects
    /// `kind`.
    pub(crate) const fn new(tag: u8, kind: &'static str) -> Self {
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

    /// Number of live handles.
    pub(crate) fn live(&self) -> usize {
        self.inner.read().live
    }

    fn encode(&self, index: u32, generation: u32) -> i64 {
        let raw = (u64::from(self.tag) << TAG_SHIFT)
            | (u64::from(generation) << GENERATION_SHIFT)
            | u64::from(index);
        // The tag is at most 127, so bit 63 is 0 and the value is positive.
        raw as i64
    }

    fn decode(&self, handle: i64) -> Result<(usize, u32), HandleError> {
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

    /// Stores `value` and returns its new handle.
    pub(crate) fn insert(&self, value: Arc<T>) -> Result<i64, HandleError> {
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
    pub(crate) fn get(&self, handle: i64) -> Result<Arc<T>, HandleError> {
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
    pub(crate) fn remove(&self, handle: i64) -> Result<Arc<T>, HandleError> {
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

    /// An older generation was issued and removed since (stale); a newer one, or 0, was never
    /// issued (unknown).
    fn mismatch(&self, handle: i64, current: u32, asked: u32) -> HandleError {
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

    #[test]
    fn round_trip_stale_unknown_and_wrong_kind() {
        let t: HandleTable<u32> = HandleTable::new(3, "sorter");
        let a = t.insert(Arc::new(7)).unwrap();
        assert_eq!(*t.get(a).unwrap(), 7);
        assert_eq!(t.live(), 1);
        assert_eq!(*t.remove(a).unwrap(), 7);
        assert_eq!(t.live(), 0);
        assert!(matches!(t.get(a), Err(HandleError::Stale { .. })));
        assert!(matches!(t.remove(a), Err(HandleError::Stale { .. })));
        // The slot is reused with the next generation: the old handle stays stale.
        let b = t.insert(Arc::new(8)).unwrap();
        assert_ne!(a, b);
        assert!(matches!(t.get(a), Err(HandleError::Stale { .. })));
        assert_eq!(*t.get(b).unwrap(), 8);
        assert_eq!(
            t.get(0).unwrap_err().to_string(),
            "null sorter handle (0x0)"
        );
        assert!(t
            .get(-1)
            .unwrap_err()
            .to_string()
            .ends_with("is not a sorter handle"));
        assert!(t
            .get(1 << 56)
            .unwrap_err()
            .to_string()
            .ends_with("is not a sorter handle"));
        let never = (3i64 << 56) | (0x7fff_ffff << 24);
        assert!(matches!(t.get(never), Err(HandleError::Unknown { .. })));
        let beyond = (3i64 << 56) | (1 << 24) | 0xff_fff0;
        assert!(t
            .get(beyond)
            .unwrap_err()
            .to_string()
            .contains("is unknown"));
    }
}
