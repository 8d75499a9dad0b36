//! Memory wanted back: `reclaim` (the listener's owner asks: unused cushion first, then slack,
//! then spills) and the spills a grow or a reclaim makes.

use crate::sync::Ordering;

use super::{saturating_add, Budget};
use crate::error::Result;
use crate::tree::PoolNode;
use crate::units::human;

impl Budget {
    /// What the listener's owner calls when it wants memory back (see `MemoryManager::reclaim`).
    pub(crate) fn reclaim(&self, target: u64) -> Result<u64> {
        // Spark calls this under the task's monitor: a grow on this thread meanwhile (a spiller
        // writing) must not reach into other tasks (see `arbitration_allowed`).
        let _no_arbitration = crate::listener::NoArbitration::enter();
        let mut given = self.release_unused(target)?;
        let mut refilled = false;
        if given < target && self.trim_all(None) > 0 {
            // Reservations' slack is unused memory: it goes before any operator spills.
            refilled = true;
            given += self.release_unused(target - given)?;
        }
        if given < target {
            // What the spill frees stays in the cushion (no hysteresis hand-back on the way), so
            // the second release hands back exactly this call's bytes: the count reported to the
            // listener's owner never includes bytes other threads gave back meanwhile.
            refilled = true;
            self.spill_held(target - given, None)?;
            given += self.release_unused(target - given)?;
        }
        if refilled {
            // What the slack or the spill left beyond the hysteresis band goes back too.
            if let Err(e) = self.release_surplus() {
                log::warn!("[{}] handing back surplus after a reclaim: {e}", self.name);
            }
        }
        Ok(given)
    }

    /// Hands idle memory back to the listener, up to `max` bytes: the unused cushion, then
    /// every slack (quantum mode) taken back into the cushion; no spiller is asked. What the
    /// slack left beyond the hysteresis band goes back too. Returns the bytes handed back
    /// within `max`. What an arbiter asks of the other tasks.
    pub(crate) fn release_idle(&self, max: u64) -> Result<u64> {
        let mut given = self.release_unused(max)?;
        if given < max && self.trim_all(None) > 0 {
            given += self.release_unused(max - given)?;
            if let Err(e) = self.release_surplus() {
                log::warn!("[{}] handing back surplus after a trim: {e}", self.name);
            }
        }
        Ok(given)
    }

    /// Spills keeping what is freed in the cushion for the caller (a grow's retry, or `reclaim`).
    pub(super) fn spill_held(&self, target: u64, scope: Option<&PoolNode>) -> Result<u64> {
        // Relaxed (both): read only as a hint by `release` (see there); the releases it must
        // hold back happen after this increment on this thread or through the spiller's own
        // synchronization.
        self.held_spills.fetch_add(1, Ordering::Relaxed);
        let result = self.spill_within(target, scope);
        self.held_spills.fetch_sub(1, Ordering::Relaxed);
        result
    }

    pub(crate) fn spill_within(&self, target: u64, scope: Option<&PoolNode>) -> Result<u64> {
        if target == 0 {
            return Ok(0);
        }
        let outcome = self.spillers.spill(target, scope)?;
        if outcome.freed > 0 {
            // Relaxed (both): statistics. Saturating, like the spill round that produced them.
            saturating_add(&self.counters.spill_count, outcome.spills);
            saturating_add(&self.counters.spilled_bytes, outcome.freed);
            log::debug!(
                "[{}] spilled {} of {} asked",
                self.name,
                human(outcome.freed),
                human(target)
            );
        }
        Ok(outcome.freed)
    }
}
