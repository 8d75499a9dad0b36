//! Usage and leak reports: what the manager holds, as a tree, in human units.

use std::fmt;

use crate::units::human;

/// One pool in a [`UsageReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    /// Full path, e.g. `root/sort`.
    pub path: String,
    /// Depth below the root (root = 0).
    pub depth: usize,
    /// Bytes charged now (this pool and below).
    pub used: u64,
    /// Highest `used` seen.
    pub peak: u64,
    /// Limit in bytes, if any.
    pub limit: Option<u64>,
    /// Bytes of this pool's own live allocations.
    pub allocated: u64,
}

/// One consumer in a [`UsageReport`]: a reservation, or the allocations of one pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerUsage {
    /// `name#id` of a reservation, or `allocations` for a pool's allocations.
    pub name: String,
    /// Path of its pool.
    pub pool: String,
    /// Bytes held now.
    pub used: u64,
    /// Highest bytes held (equal to `used` for allocations).
    pub peak: u64,
}

/// A snapshot of a manager's memory: totals, the pool tree and the largest consumers. Its
/// `Display` is the body of every out-of-memory error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageReport {
    /// Manager (task) name.
    pub manager: String,
    /// Bytes used by the whole task.
    pub used: u64,
    /// Peak of `used`.
    pub peak: u64,
    /// Bytes reserved from the listener.
    pub reserved: u64,
    /// Task limit, if any.
    pub task_limit: Option<u64>,
    /// Reservation block size.
    pub reservation_block: u64,
    /// Spills so far and bytes they freed.
    pub spill_count: u64,
    /// Bytes freed by spills so far.
    pub spilled_bytes: u64,
    /// Bytes the task's spills wrote, as its engine reported them
    /// ([`MemoryManager::note_spill_written`](crate::MemoryManager::note_spill_written)).
    pub spill_written_bytes: u64,
    /// Over-commit now: bytes charged without the listener's cover by a forced grow
    /// ([`Reservation::force_grow`](crate::Reservation::force_grow), e.g. a tracking allocator)
    /// and not yet paid for by a grow or released.
    pub overcommitted: u64,
    /// Bytes forced grows over-committed so far (cumulative).
    pub overcommitted_total: u64,
    /// Every pool, parents before children.
    pub pools: Vec<PoolUsage>,
    /// The largest consumers, largest first (at most [`UsageReport::TOP_CONSUMERS`]).
    pub top_consumers: Vec<ConsumerUsage>,
}

impl UsageReport {
    /// How many consumers the report lists.
    pub const TOP_CONSUMERS: usize = 10;
}

fn limit_text(limit: Option<u64>) -> String {
    match limit {
        Some(l) => human(l).to_string(),
        None => "none".to_string(),
    }
}

impl fmt::Display for UsageReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Native memory of '{}': used {}, peak {}, reserved {}, task limit {}, block {}, spills {} ({})",
            self.manager,
            human(self.used),
            human(self.peak),
            human(self.reserved),
            limit_text(self.task_limit),
            human(self.reservation_block),
            self.spill_count,
            human(self.spilled_bytes),
        )?;
        if self.spill_written_bytes > 0 {
            writeln!(
                f,
                "Spill files written: {} (as the engine reported)",
                human(self.spill_written_bytes)
            )?;
        }
        if self.overcommitted > 0 || self.overcommitted_total > 0 {
            writeln!(
                f,
                "Over-committed: {} now, {} so far (forced charges beyond what was reserved; the next grow pays them)",
                human(self.overcommitted),
                human(self.overcommitted_total),
            )?;
        }
        writeln!(f, "Pools:")?;
        for p in &self.pools {
            let name = p.path.rsplit('/').next().unwrap_or(&p.path);
            let indent = "  ".repeat(p.depth + 1);
            let width = 28usize.saturating_sub(indent.len());
            writeln!(
                f,
                "{indent}{name:<width$} used {:>10}  peak {:>10}  limit {}",
                human(p.used).to_string(),
                human(p.peak).to_string(),
                limit_text(p.limit),
            )?;
        }
        if self.top_consumers.is_empty() {
            write!(f, "Top consumers: none")?;
        } else {
            write!(f, "Top consumers:")?;
            for (i, c) in self.top_consumers.iter().enumerate() {
                write!(
                    f,
                    "\n  {}. {} in {}: used {}, peak {}",
                    i + 1,
                    c.name,
                    c.pool,
                    human(c.used),
                    human(c.peak)
                )?;
            }
        }
        Ok(())
    }
}

/// What kind of thing leaked.
///
/// Non-exhaustive: new kinds may be added; match with a wildcard arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeakKind {
    /// Allocations (`Pool::allocate`) never freed; the manager freed them at close.
    Allocation,
    /// A reservation still holding bytes at close; the manager released them.
    Reservation,
    /// [`Allocation`](crate::Allocation) values still alive at close: their accounting was
    /// released; their memory is freed when they are dropped.
    HeldAllocation,
}

/// One entry of a [`LeakReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leak {
    /// Allocation or reservation.
    pub kind: LeakKind,
    /// Reservation `name#id`, or `allocations`.
    pub name: String,
    /// Pool path.
    pub pool: String,
    /// Bytes reclaimed.
    pub bytes: u64,
    /// Number of allocations (1 for a reservation).
    pub count: u64,
}

/// What `close` had to reclaim because its owners did not give it back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeakReport {
    /// Manager name.
    pub manager: String,
    /// The leaks, by pool and consumer.
    pub leaks: Vec<Leak>,
    /// Bytes this close gave back to the listener (the whole cushion plus what it reclaimed).
    pub returned_to_listener: u64,
}

impl LeakReport {
    /// Total bytes reclaimed.
    pub fn total_bytes(&self) -> u64 {
        self.leaks.iter().map(|l| l.bytes).sum()
    }

    /// True when nothing leaked.
    pub fn is_empty(&self) -> bool {
        self.leaks.is_empty()
    }

    pub(crate) fn add(&mut self, kind: LeakKind, name: &str, pool: &str, bytes: u64) {
        self.add_n(kind, name, pool, bytes, 1);
    }

    /// Adds `count` leaks of `bytes` in all.
    pub(crate) fn add_n(&mut self, kind: LeakKind, name: &str, pool: &str, bytes: u64, count: u64) {
        if let Some(l) = self
            .leaks
            .iter_mut()
            .find(|l| l.kind == kind && l.name == name && l.pool == pool)
        {
            l.bytes += bytes;
            l.count += count;
        } else {
            self.leaks.push(Leak {
                kind,
                name: name.to_string(),
                pool: pool.to_string(),
                bytes,
                count,
            });
        }
    }
}

impl fmt::Display for LeakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.leaks.is_empty() {
            return write!(f, "'{}' closed with no leaks", self.manager);
        }
        write!(
            f,
            "'{}' closed with {} leaked at close (reclaimed):",
            self.manager,
            human(self.total_bytes())
        )?;
        for l in &self.leaks {
            match l.kind {
                LeakKind::Allocation => write!(
                    f,
                    "\n  {} allocation(s) in {}: {}",
                    l.count,
                    l.pool,
                    human(l.bytes)
                )?,
                LeakKind::HeldAllocation => write!(
                    f,
                    "\n  {} allocation(s) in {} still held by their owner (accounting released): {}",
                    l.count,
                    l.pool,
                    human(l.bytes)
                )?,
                LeakKind::Reservation => write!(
                    f,
                    "\n  reservation {} in {}: {}",
                    l.name,
                    l.pool,
                    human(l.bytes)
                )?,
            }
        }
        Ok(())
    }
}
