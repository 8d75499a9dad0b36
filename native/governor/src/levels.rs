//! Pressure levels and how often to look.
//!
//! Two levels, as fractions of the binding limit:
//!
//! - **soft** (default 0.85): idle memory goes back (every manager's cushion and slack to Spark,
//!   free pages to the kernel), then native spillers spill, largest first, until usage is under
//!   the level again.
//! - **hard** (default 0.93): in addition, fallible native grows that need a new block are
//!   refused, so operators spill or the task fails (Spark retries it) instead of the kernel
//!   killing the executor with all its tasks. Forced charges still never fail.
//!
//! A level is left only once usage is `exit_margin` (default 0.03) below it, so a figure hovering
//! at a threshold does not flip the level on every sample.
//!
//! Why these defaults: the kernel acts on the cgroup's total charge, which is anonymous memory
//! plus page cache and kernel memory; page cache is reclaimed first, kernel memory (sockets,
//! page tables, slabs) is a few percent. 7% above hard is left for that and for the growth of
//! one sampling interval (at 20 ms and 2 GB/s of allocation: 40 MB). 8% between soft and hard
//! gives the relief ladder room to work before anything is refused.
//!
//! Sampling adapts to the headroom: every `max_interval` (1 s) while usage is at most half the
//! limit, every `min_interval` (20 ms) from the soft level up, linearly in between.

use std::fmt;
use std::time::Duration;

/// The governor's level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Pressure {
    /// Under the soft level (or no limit).
    None = 0,
    /// Over the soft level: idle memory goes back, spillers spill.
    Soft = 1,
    /// Over the hard level: fallible grows needing a new block are refused too.
    Hard = 2,
}

impl Pressure {
    /// The level stored as `as u8`.
    pub fn from_u8(v: u8) -> Pressure {
        match v {
            1 => Pressure::Soft,
            2 => Pressure::Hard,
            _ => Pressure::None,
        }
    }

    /// Lower-case name for logs and gauges.
    pub fn name(self) -> &'static str {
        match self {
            Pressure::None => "none",
            Pressure::Soft => "soft",
            Pressure::Hard => "hard",
        }
    }
}

impl fmt::Display for Pressure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The levels and the sampling bounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    /// Soft level, fraction of the limit (0, 1].
    pub soft: f64,
    /// Hard level, fraction of the limit [soft, 1].
    pub hard: f64,
    /// A level is left below `level - exit_margin`, fraction of the limit [0, soft).
    pub exit_margin: f64,
    /// Shortest sampling interval (at and above the soft level).
    pub min_interval: Duration,
    /// Longest sampling interval (at half the limit and below).
    pub max_interval: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            soft: 0.85,
            hard: 0.93,
            exit_margin: 0.03,
            min_interval: Duration::from_millis(20),
            max_interval: Duration::from_secs(1),
        }
    }
}

/// Thresholds that cannot work, with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidThresholds(pub String);

impl fmt::Display for InvalidThresholds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid governor levels: {}", self.0)
    }
}

impl std::error::Error for InvalidThresholds {}

impl Thresholds {
    /// Checks the ordering 0 <= exit_margin < soft <= hard <= 1 and min <= max interval.
    pub fn validate(&self) -> Result<(), InvalidThresholds> {
        let ok = |c: bool, why: String| {
            if c {
                Ok(())
            } else {
                Err(InvalidThresholds(why))
            }
        };
        ok(
            self.soft > 0.0 && self.soft <= 1.0,
            format!("soft level {} must be in (0, 1]", self.soft),
        )?;
        ok(
            self.hard >= self.soft && self.hard <= 1.0,
            format!(
                "hard level {} must be in [soft {}, 1]",
                self.hard, self.soft
            ),
        )?;
        ok(
            self.exit_margin >= 0.0 && self.exit_margin < self.soft,
            format!(
                "exit margin {} must be in [0, soft {})",
                self.exit_margin, self.soft
            ),
        )?;
        ok(
            !self.min_interval.is_zero() && self.min_interval <= self.max_interval,
            format!(
                "sampling interval bounds {:?}..{:?} must be non-zero and ordered",
                self.min_interval, self.max_interval
            ),
        )
    }

    /// Bytes at which `level` starts for `limit`.
    pub fn bytes_at(&self, level: Pressure, limit: u64) -> u64 {
        let fraction = match level {
            Pressure::None => 0.0,
            Pressure::Soft => self.soft,
            Pressure::Hard => self.hard,
        };
        (limit as f64 * fraction) as u64
    }

    /// The level for `usage` under `limit`, given the level before (hysteresis).
    pub fn level(&self, before: Pressure, usage: u64, limit: Option<u64>) -> Pressure {
        let Some(limit) = limit.filter(|&l| l > 0) else {
            return Pressure::None;
        };
        let fraction = usage as f64 / limit as f64;
        let above = |level: f64, was_in: bool| {
            fraction >= level || (was_in && fraction >= level - self.exit_margin)
        };
        if above(self.hard, before == Pressure::Hard) {
            Pressure::Hard
        } else if above(self.soft, before >= Pressure::Soft) {
            Pressure::Soft
        } else {
            Pressure::None
        }
    }

    /// How long to wait before the next sample.
    pub fn interval(&self, usage: u64, limit: Option<u64>) -> Duration {
        let Some(limit) = limit.filter(|&l| l > 0) else {
            return self.max_interval;
        };
        let fraction = usage as f64 / limit as f64;
        let far = 0.5_f64.min(self.soft);
        if fraction <= far {
            self.max_interval
        } else if fraction >= self.soft {
            self.min_interval
        } else {
            let t = (fraction - far) / (self.soft - far);
            let span = self.max_interval.as_secs_f64() - self.min_interval.as_secs_f64();
            Duration::from_secs_f64(self.max_interval.as_secs_f64() - t * span)
        }
    }
}
