//! One sample and what follows from it: [`Governor::tick`]; and the thread that ticks
//! ([`GovernorThread`]).
//!
//! A tick reads the container ([`Probe`]), sets the level ([`Thresholds::level`]), publishes it
//! in [`Published`] (atomics: a grow consults the last sample with one load, no syscall) and, at
//! soft pressure or above, climbs the relief ladder, reading the container again after each
//! step and stopping as soon as usage is under the soft level:
//!
//! 1. [`Relief::give_back_idle`]: every task manager hands its idle cushion and slack back to Spark;
//! 2. [`Relief::trim`]: the allocators return free pages (`malloc_trim`, engines' hooks);
//! 3. [`Relief::spill`]: native spillers spill, largest first, for what is still over; a trim
//!    follows a spill that freed something (what spillers free sits in the allocator until then).
//!
//! The next sample comes after the interval [`Thresholds::interval`] gives for the headroom, or
//! sooner when usage grows fast: before half the time the growth since the last sample would
//! take to reach the soft level.
//!
//! The relief calls run on the governor's thread with no lock of the governor held; what they
//! call (Spark, spillers) must not wait for the thread of another task (see the provider's
//! implementation). The level published after the ladder is the level of the last reading, so
//! hard pressure (refused grows) lasts only while the relief could not bring usage down.
//!
//! Entering hard pressure keeps a snapshot ([`Relief::describe`]: per-task usage trees, with the
//! container figures) in a short history and logs it: a lost executor can be tied to its native
//! usage from its log. The same history is what a SIGTERM handler prints.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::levels::{Pressure, Thresholds};
use crate::view::{ContainerView, Probe};

/// What the governor asks of the executor's managers and allocators. Each returns the bytes it
/// freed or handed back (0 if unknown or none).
pub trait Relief: Send + Sync {
    /// Every task manager hands its idle cushion and slack back to Spark.
    fn give_back_idle(&self) -> u64;
    /// Allocators return free pages to the kernel.
    fn trim(&self) -> u64;
    /// Native spillers spill, largest first, until about `bytes` are freed.
    fn spill(&self, bytes: u64) -> u64;
    /// The executor's native usage now (per-task trees), for the kill forensics.
    fn describe(&self) -> String;
}

/// The last sample, readable from any thread with atomic loads. A process keeps one in a
/// `static` ([`Published::new`] is `const`).
#[derive(Debug, Default)]
pub struct Published {
    pressure: AtomicU8,
    limit: AtomicU64,
    usage: AtomicU64,
    samples: AtomicU64,
    /// Native growth noted since the last sample ([`Published::note_growth`]).
    grown: AtomicU64,
    /// Growth since the last sample at which to sample at once (half the way to the next level).
    wake_at: AtomicU64,
}

impl Published {
    /// No sample yet: no pressure, no limit.
    pub const fn new() -> Self {
        Published {
            pressure: AtomicU8::new(0),
            limit: AtomicU64::new(0),
            usage: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            grown: AtomicU64::new(0),
            wake_at: AtomicU64::new(u64::MAX),
        }
    }

    /// Notes `bytes` of new native memory (a block reserved from Spark); true when the growth
    /// since the last sample just crossed half the way to the next level, so the caller should
    /// [`Waker::wake`] the governor: native growth faster than the sampling interval is seen in
    /// time. One relaxed RMW and one load.
    #[inline]
    pub fn note_growth(&self, bytes: u64) -> bool {
        let before = self.grown.fetch_add(bytes, Ordering::Relaxed);
        let at = self.wake_at.load(Ordering::Relaxed);
        before < at && before.saturating_add(bytes) >= at
    }

    /// The level of the last sample (one relaxed load).
    #[inline]
    pub fn pressure(&self) -> Pressure {
        Pressure::from_u8(self.pressure.load(Ordering::Relaxed))
    }

    /// The binding limit of the last sample, bytes (0: none).
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Anonymous usage of the last sample, bytes.
    pub fn usage(&self) -> u64 {
        self.usage.load(Ordering::Relaxed)
    }

    /// Samples taken.
    pub fn samples(&self) -> u64 {
        self.samples.load(Ordering::Relaxed)
    }

    /// Back to "no pressure, no limit" (a stopped governor).
    pub fn clear(&self) {
        self.pressure.store(Pressure::None as u8, Ordering::Relaxed);
        self.limit.store(0, Ordering::Relaxed);
        self.usage.store(0, Ordering::Relaxed);
        self.wake_at.store(u64::MAX, Ordering::Relaxed);
    }

    /// After a sample: growth is counted from 0 again, and `wake_at` bytes of it ask for the next.
    fn rearm(&self, wake_at: u64) {
        self.grown.store(0, Ordering::Relaxed);
        self.wake_at.store(wake_at, Ordering::Relaxed);
    }

    fn store(&self, view: &ContainerView, pressure: Pressure) {
        self.limit.store(view.limit.unwrap_or(0), Ordering::Relaxed);
        self.usage.store(view.usage, Ordering::Relaxed);
        self.pressure.store(pressure as u8, Ordering::Relaxed);
        self.samples.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts of what the governor did, for gauges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GovernorStats {
    /// Samples taken, and their total time (reading the files), nanoseconds.
    pub samples: u64,
    pub sample_nanos: u64,
    /// Samples that failed to read (the previous level is kept).
    pub sample_errors: u64,
    /// Times the level rose to soft / to hard.
    pub soft_entries: u64,
    pub hard_entries: u64,
    /// Relief steps taken and the bytes each reported.
    pub give_backs: u64,
    pub give_back_bytes: u64,
    pub trims: u64,
    pub trim_bytes: u64,
    pub spills: u64,
    pub spill_bytes: u64,
    /// Time from crossing the soft level to usage back under it, last episode and longest, ns.
    pub last_relief_nanos: u64,
    pub max_relief_nanos: u64,
}

/// One entry of the forensics history.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Milliseconds since the epoch.
    pub at_millis: u64,
    pub pressure: Pressure,
    pub view: ContainerView,
    /// [`Relief::describe`] then.
    pub usage: String,
}

/// Snapshots kept.
const HISTORY: usize = 4;

/// The governor's state; [`tick`](Governor::tick) takes one sample.
pub struct Governor {
    thresholds: Thresholds,
    probe: Box<dyn Probe>,
    relief: Arc<dyn Relief>,
    published: &'static Published,
    pressure: Pressure,
    last: Option<ContainerView>,
    /// Time and usage of the last sample (the growth rate sizes the next interval).
    last_sample: Option<(Instant, u64)>,
    /// The last relief round of this episode: when, usage after it, bytes it freed.
    last_round: Option<(Instant, u64, u64)>,
    /// When usage crossed the soft level (the episode being relieved).
    soft_since: Option<Instant>,
    stats: GovernorStats,
    history: VecDeque<Snapshot>,
}

impl Governor {
    /// A governor over `probe`, acting through `relief`, publishing into `published`.
    pub fn new(
        thresholds: Thresholds,
        probe: Box<dyn Probe>,
        relief: Arc<dyn Relief>,
        published: &'static Published,
    ) -> Self {
        Governor {
            thresholds,
            probe,
            relief,
            published,
            pressure: Pressure::None,
            last: None,
            last_sample: None,
            last_round: None,
            soft_since: None,
            stats: GovernorStats::default(),
            history: VecDeque::with_capacity(HISTORY),
        }
    }

    /// Takes a sample at `now`, relieves pressure, and returns how long to wait for the next.
    pub fn tick(&mut self, now: Instant) -> Duration {
        let Some(mut view) = self.sample() else {
            return self.thresholds.min_interval;
        };
        let mut level = self.thresholds.level(self.pressure, view.usage, view.limit);
        self.enter(level, &view, now);
        if level >= Pressure::Soft && self.relief_due(now, &view) {
            let limit = view.limit.unwrap_or(0);
            let target = self.thresholds.bytes_at(Pressure::Soft, limit);
            let mut round_freed = 0u64;
            for step in 0..3 {
                let freed = match step {
                    0 => {
                        let b = self.relief.give_back_idle();
                        self.stats.give_backs += 1;
                        self.stats.give_back_bytes += b;
                        b
                    }
                    1 => {
                        let b = self.relief.trim();
                        self.stats.trims += 1;
                        self.stats.trim_bytes += b;
                        b
                    }
                    _ => {
                        let b = self.relief.spill(view.usage.saturating_sub(target));
                        self.stats.spills += 1;
                        self.stats.spill_bytes += b;
                        if b > 0 {
                            // What the spillers freed sits in the allocator until trimmed.
                            self.stats.trim_bytes += self.relief.trim();
                            self.stats.trims += 1;
                        }
                        b
                    }
                };
                round_freed = round_freed.saturating_add(freed);
                log::debug!("nativemem governor: relief step {step} freed {freed} bytes");
                match self.sample() {
                    Some(again) => view = again,
                    None => break,
                }
                level = self.thresholds.level(self.pressure, view.usage, view.limit);
                if view.usage < target {
                    break;
                }
            }
            self.last_round = Some((now, view.usage, round_freed));
            self.enter(level, &view, now);
        }
        if level == Pressure::None {
            self.last_round = None;
            if let Some(since) = self.soft_since.take() {
                let nanos = now.saturating_duration_since(since).as_nanos() as u64;
                self.stats.last_relief_nanos = nanos;
                self.stats.max_relief_nanos = self.stats.max_relief_nanos.max(nanos);
            }
        }
        let mut interval = self.thresholds.interval(view.usage, view.limit);
        // Growing fast: look again before the growth seen since the last sample could reach the
        // soft level (half the projected time), never more often than `min_interval`.
        if let (Some((then, before)), Some(limit)) = (self.last_sample, view.limit) {
            let soft = self.thresholds.bytes_at(Pressure::Soft, limit);
            let dt = now.saturating_duration_since(then).as_secs_f64();
            if view.usage > before && view.usage < soft && dt > 0.0 {
                let rate = (view.usage - before) as f64 / dt;
                let to_soft = Duration::from_secs_f64((soft - view.usage) as f64 / rate / 2.0);
                interval = interval.min(to_soft).max(self.thresholds.min_interval);
            }
        }
        self.last_sample = Some((now, view.usage));
        let wake_at = match view.limit {
            Some(limit) => {
                let next = match level {
                    Pressure::None => self.thresholds.bytes_at(Pressure::Soft, limit),
                    Pressure::Soft => self.thresholds.bytes_at(Pressure::Hard, limit),
                    Pressure::Hard => u64::MAX,
                };
                if next == u64::MAX {
                    u64::MAX
                } else {
                    (next.saturating_sub(view.usage) / 2).max(1)
                }
            }
            None => u64::MAX,
        };
        self.published.rearm(wake_at);
        self.last = Some(view);
        interval
    }

    /// Whether to climb the relief ladder at this sample: always the first time in an episode, and
    /// after a round that freed something; after a round that freed nothing (nothing idle,
    /// nothing spillable: the pressure is not native memory's), only once usage rose by 1% of
    /// the limit or `max_interval` passed, so a container full of memory nobody can give back
    /// does not cost a trim and a walk of every manager every `min_interval`.
    fn relief_due(&self, now: Instant, view: &ContainerView) -> bool {
        match self.last_round {
            None => true,
            Some((_, _, freed)) if freed > 0 => true,
            Some((at, usage, _)) => {
                let step = view.limit.unwrap_or(0) / 100;
                view.usage > usage.saturating_add(step)
                    || now.saturating_duration_since(at) >= self.thresholds.max_interval
            }
        }
    }

    /// Publishes `level` and records an entry into soft or hard pressure.
    fn enter(&mut self, level: Pressure, view: &ContainerView, now: Instant) {
        let before = self.pressure;
        if level >= Pressure::Soft && before == Pressure::None {
            self.stats.soft_entries += 1;
            self.soft_since.get_or_insert(now);
            log::info!(
                "nativemem governor: soft pressure: {} of {} anonymous ({}); giving idle memory back and spilling",
                view.usage,
                view.limit.unwrap_or(0),
                view.limit_from
            );
        }
        if level == Pressure::Hard && before != Pressure::Hard {
            self.stats.hard_entries += 1;
            let snapshot = self.snapshot(level, view);
            log::warn!(
                "nativemem governor: hard pressure: {} of {} anonymous ({}), page cache {}; refusing native grows \
                 that need memory from Spark until usage falls. Native usage:\n{}",
                view.usage,
                view.limit.unwrap_or(0),
                view.limit_from,
                view.cache,
                snapshot.usage
            );
            self.keep(snapshot);
        }
        if level < before {
            log::info!(
                "nativemem governor: pressure {before} -> {level} ({} of {} anonymous)",
                view.usage,
                view.limit.unwrap_or(0)
            );
        }
        self.pressure = level;
        self.published.store(view, level);
    }

    fn sample(&mut self) -> Option<ContainerView> {
        let start = Instant::now();
        let read = self.probe.read();
        self.stats.samples += 1;
        self.stats.sample_nanos += start.elapsed().as_nanos() as u64;
        match read {
            Ok(view) => Some(view),
            Err(e) => {
                self.stats.sample_errors += 1;
                if self.stats.sample_errors == 1 {
                    log::warn!("nativemem governor: cannot read the container's memory: {e} (the level stays {})", self.pressure);
                }
                None
            }
        }
    }

    fn snapshot(&self, pressure: Pressure, view: &ContainerView) -> Snapshot {
        Snapshot {
            at_millis: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            pressure,
            view: view.clone(),
            usage: self.relief.describe(),
        }
    }

    fn keep(&mut self, snapshot: Snapshot) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(snapshot);
    }

    /// Records a snapshot now (e.g. on SIGTERM) and returns the history as text, oldest first.
    pub fn forensics(&mut self) -> String {
        if let Some(view) = self.last.clone() {
            let snapshot = self.snapshot(self.pressure, &view);
            self.keep(snapshot);
        }
        let mut out = String::new();
        for s in &self.history {
            let _ = writeln!(
                out,
                "at {} ms: pressure {}, anonymous {} of limit {} ({}), page cache {}, OOM kills {:?}\n{}",
                s.at_millis,
                s.pressure,
                s.view.usage,
                s.view.limit.unwrap_or(0),
                s.view.limit_from,
                s.view.cache,
                s.view.oom_kills,
                s.usage
            );
        }
        out
    }

    /// What the governor did so far.
    pub fn stats(&self) -> &GovernorStats {
        &self.stats
    }

    /// The level now.
    pub fn pressure(&self) -> Pressure {
        self.pressure
    }

    /// The last reading.
    pub fn last_view(&self) -> Option<&ContainerView> {
        self.last.as_ref()
    }
}

/// The governor on its own thread, ticking until dropped or [`stop`](GovernorThread::stop)ped.
pub struct GovernorThread {
    shared: Arc<ThreadShared>,
    handle: Option<JoinHandle<()>>,
}

struct ThreadShared {
    /// Set by [`Waker::wake`]: sample now instead of waiting out the interval.
    wake_pending: AtomicBool,
    governor: Mutex<Governor>,
    /// A copy of the stats after each tick: readers never wait for a tick's relief calls.
    stats: Mutex<GovernorStats>,
    stop: AtomicBool,
    wake: Condvar,
    sleeping: Mutex<()>,
}

impl GovernorThread {
    /// Starts ticking `governor` on a thread named `nativemem-governor`.
    pub fn start(governor: Governor) -> std::io::Result<GovernorThread> {
        let shared = Arc::new(ThreadShared {
            wake_pending: AtomicBool::new(false),
            stats: Mutex::new(governor.stats().clone()),
            governor: Mutex::new(governor),
            stop: AtomicBool::new(false),
            wake: Condvar::new(),
            sleeping: Mutex::new(()),
        });
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("nativemem-governor".into())
            .spawn(move || {
                while !s.stop.load(Ordering::Acquire) {
                    let wait = {
                        let mut g = s.governor.lock().unwrap_or_else(|p| p.into_inner());
                        // A panic in a relief call must not end the governor (or cross anything).
                        let wait =
                            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                g.tick(Instant::now())
                            })) {
                                Ok(wait) => wait,
                                Err(_) => {
                                    log::error!(
                                        "nativemem governor: a sample panicked; trying again later"
                                    );
                                    Duration::from_secs(1)
                                }
                            };
                        *s.stats.lock().unwrap_or_else(|p| p.into_inner()) = g.stats().clone();
                        wait
                    };
                    let guard = s.sleeping.lock().unwrap_or_else(|p| p.into_inner());
                    if s.stop.load(Ordering::Acquire) {
                        break;
                    }
                    let _ = s.wake.wait_timeout(guard, wait);
                }
            })?;
        Ok(GovernorThread {
            shared,
            handle: Some(handle),
        })
    }

    /// A handle that makes the thread sample now.
    pub fn waker(&self) -> Waker {
        Waker(self.shared.clone())
    }

    /// What the governor did, as of its last tick (never waits for a tick in progress).
    pub fn stats(&self) -> GovernorStats {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs `f` on the governor between ticks (forensics); waits for a tick in progress.
    pub fn with<R>(&self, f: impl FnOnce(&mut Governor) -> R) -> R {
        let mut g = self
            .shared
            .governor
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _g = self
                .shared
                .sleeping
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Makes a [`GovernorThread`] sample now (e.g. when native memory grew fast, see
/// [`Published::note_growth`]). Cheap to clone; waking a stopped thread does nothing.
#[derive(Clone)]
pub struct Waker(Arc<ThreadShared>);

impl Waker {
    /// Asks for a sample now; never waits for the tick itself.
    pub fn wake(&self) {
        self.0.wake_pending.store(true, Ordering::Release);
        let _g = self.0.sleeping.lock().unwrap_or_else(|p| p.into_inner());
        self.0.wake.notify_all();
    }
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waker")
    }
}

impl Drop for GovernorThread {
    fn drop(&mut self) {
        self.stop();
    }
}
