//! Native consumers that can free memory on request, and the policy that picks them.
//!
//! Policy (Spark's `TaskMemoryManager`): to free `target` bytes, ask first the spiller whose
//! spillable size is the smallest that still covers what is missing (it frees enough while
//! disturbing the least data), else the largest; repeat until covered or no spiller is left.
//! Each spiller is asked at most once per round.
//!
//! Lock rule: the registry lock is held only to copy the list of spillers (`Arc`s); it is released
//! before any spiller is asked its size or told to spill. A spiller may therefore call back into
//! the manager (shrink its reservations, free allocations, even grow) without deadlocking. A
//! spiller that is already spilling (re-entered through a grow it makes while spilling, or asked
//! by another thread at the same time) is skipped rather than called twice.

use crate::sync::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use crate::sync::Mutex;

use crate::error::{ListenerError, MemoryError, Result};
use crate::tree::PoolNode;

/// A native consumer that can give memory back, e.g. a sort that writes its buffer to disk.
///
/// # Callback rules
/// - `spill` may be called on any thread, including a JVM thread inside Spark's
///   `TaskMemoryManager` (holding its monitor) and a thread that is in the middle of a grow of
///   the same manager.
/// - It may shrink or free its reservations and allocations (that is how the bytes come back); it
///   should not wait for another thread that may itself be waiting for memory.
/// - It returns the bytes it freed (0 if it could not free anything). An error fails the request
///   that caused the spill.
/// - Returning more than `spillable_bytes()` counts as `spillable_bytes()`: the manager caps what
///   one call reports at the size the spiller gave for that round (the size it was chosen by), so
///   a spiller that over-reports can neither overflow nor inflate the spill counts.
pub trait Spiller: Send + Sync {
    /// Bytes a spill could free now.
    fn spillable_bytes(&self) -> u64;
    /// Frees at least `target` bytes if it can; returns the bytes freed (at most
    /// [`spillable_bytes`](Self::spillable_bytes); more counts as that much).
    fn spill(&self, target: u64) -> Result<u64>;
}

pub(crate) struct SpillerEntry {
    id: u64,
    name: String,
    node: Arc<PoolNode>,
    spiller: Arc<dyn Spiller>,
    busy: AtomicBool,
}

/// The spillers of one manager. Shared (`Arc`) so a [`SpillerRegistration`] can find it without
/// knowing the manager.
pub(crate) struct SpillerRegistry {
    entries: Mutex<Vec<Arc<SpillerEntry>>>,
    /// Next registration id.
    ids: AtomicU64,
}

impl Default for SpillerRegistry {
    fn default() -> Self {
        SpillerRegistry {
            entries: Mutex::new(Vec::new()),
            ids: AtomicU64::new(1),
        }
    }
}

/// Keeps a spiller registered; dropping it unregisters the spiller.
pub struct SpillerRegistration {
    id: u64,
    registry: Weak<SpillerRegistry>,
}

impl std::fmt::Debug for SpillerRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpillerRegistration")
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for SpillerRegistration {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.upgrade() {
            let removed = {
                let mut entries = registry.entries.lock();
                let at = entries.iter().position(|e| e.id == self.id);
                at.map(|i| entries.remove(i))
            };
            // Dropped outside the lock (lock rule): the spiller may own reservations whose release
            // calls the listener.
            drop(removed);
        }
    }
}

/// Outcome of one spill round.
pub(crate) struct SpillOutcome {
    pub(crate) freed: u64,
    pub(crate) spills: u64,
}

impl SpillerRegistry {
    pub(crate) fn register(
        self: &Arc<Self>,
        name: String,
        node: Arc<PoolNode>,
        spiller: Arc<dyn Spiller>,
    ) -> SpillerRegistration {
        // Relaxed: ids need only be unique, which RMW atomicity alone guarantees.
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        self.entries.lock().push(Arc::new(SpillerEntry {
            id,
            name,
            node,
            spiller,
            busy: AtomicBool::new(false),
        }));
        SpillerRegistration {
            id,
            registry: Arc::downgrade(self),
        }
    }

    pub(crate) fn clear(&self) {
        let entries = std::mem::take(&mut *self.entries.lock());
        // Dropped outside the lock (lock rule), as in `SpillerRegistration::drop`.
        drop(entries);
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// Asks spillers under `scope` (all if `None`) to free `target` bytes, by the policy above.
    pub(crate) fn spill(&self, target: u64, scope: Option<&PoolNode>) -> Result<SpillOutcome> {
        let mut outcome = SpillOutcome {
            freed: 0,
            spills: 0,
        };
        if target == 0 {
            return Ok(outcome);
        }
        // Copy under the lock, call without it (lock rule).
        let entries: Vec<Arc<SpillerEntry>> = {
            let all = self.entries.lock();
            all.iter()
                .filter(|e| scope.is_none_or(|s| e.node.is_within(s)))
                .cloned()
                .collect()
        };
        let mut candidates: Vec<(Arc<SpillerEntry>, u64)> = entries
            .into_iter()
            // Relaxed: a hint that saves a size query; the `swap` below decides.
            .filter(|e| !e.busy.load(Ordering::Relaxed))
            .map(|e| {
                // A panicking size query counts as nothing to spill (same containment as `spill`).
                let size = crate::error::contain(|| Ok(e.spiller.spillable_bytes())).unwrap_or(0);
                (e, size)
            })
            .filter(|(_, size)| *size > 0)
            .collect();
        while outcome.freed < target && !candidates.is_empty() {
            let need = target - outcome.freed;
            let pick = pick_victim(&candidates, need);
            let (entry, spillable) = candidates.swap_remove(pick);
            // Acquire: `busy` is a try-lock around the call; taking it orders this call after the
            // previous one (whose end released it). Taking it publishes nothing, so no Release.
            if entry.busy.swap(true, Ordering::Acquire) {
                continue;
            }
            let result = crate::error::contain(|| {
                entry
                    .spiller
                    .spill(need)
                    .map_err(|e| Box::new(e) as ListenerError)
            })
            .map_err(|source| match source.downcast::<MemoryError>() {
                Ok(e) => *e,
                Err(source) => MemoryError::Spill {
                    spiller: entry.name.clone(),
                    source,
                },
            });
            // Release: ends the call for the next thread that takes the flag (see above).
            entry.busy.store(false, Ordering::Release);
            match result {
                Ok(freed) => {
                    log::debug!(
                        "spiller '{}' in pool '{}' freed {freed} of {need} bytes asked",
                        entry.name,
                        entry.node.path
                    );
                    // Returning more than it said it could free counts as what it said (the
                    // `Spiller` contract): no overflow, no inflated counts.
                    if freed > spillable {
                        log::warn!(
                            "spiller '{}' in pool '{}' said it freed {freed} bytes of {spillable} \
                             spillable; counting {spillable}",
                            entry.name,
                            entry.node.path
                        );
                    }
                    let counted = freed.min(spillable);
                    if counted > 0 {
                        outcome.freed = outcome.freed.saturating_add(counted);
                        outcome.spills = outcome.spills.saturating_add(1);
                    }
                }
                Err(e @ MemoryError::Spill { .. }) => return Err(e),
                Err(e) => {
                    return Err(MemoryError::Spill {
                        spiller: entry.name.clone(),
                        source: Box::new(e),
                    })
                }
            }
        }
        Ok(outcome)
    }
}

/// Index of the smallest candidate whose size covers `need`, else of the largest.
fn pick_victim(candidates: &[(Arc<SpillerEntry>, u64)], need: u64) -> usize {
    let covering = candidates
        .iter()
        .enumerate()
        .filter(|(_, (_, size))| *size >= need)
        .min_by_key(|(_, (_, size))| *size)
        .map(|(i, _)| i);
    covering.unwrap_or_else(|| {
        candidates
            .iter()
            .enumerate()
            .max_by_key(|(_, (_, size))| *size)
            .map(|(i, _)| i)
            .unwrap_or(0)
    })
}
