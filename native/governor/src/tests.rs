//! The levels and the tick with an injected clock, probe and relief.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::governor::{Governor, GovernorThread, Published, Relief};
use crate::levels::{Pressure, Thresholds};
use crate::view::{ContainerView, Probe, Source};

const GIB: u64 = 1 << 30;

#[test]
fn levels_with_hysteresis() {
    let t = Thresholds::default();
    let limit = Some(100 * GIB);
    let at = |pct: u64| pct * GIB;
    assert_eq!(t.level(Pressure::None, at(84), limit), Pressure::None);
    assert_eq!(t.level(Pressure::None, at(85), limit), Pressure::Soft);
    assert_eq!(t.level(Pressure::None, at(93), limit), Pressure::Hard);
    // Leaving needs exit_margin (3%) below the level.
    assert_eq!(t.level(Pressure::Soft, at(83), limit), Pressure::Soft);
    assert_eq!(t.level(Pressure::Soft, at(81), limit), Pressure::None);
    assert_eq!(t.level(Pressure::Hard, at(91), limit), Pressure::Hard);
    assert_eq!(t.level(Pressure::Hard, at(89), limit), Pressure::Soft);
    assert_eq!(t.level(Pressure::Hard, at(10), limit), Pressure::None);
    // No limit, or a zero limit: nothing to govern.
    assert_eq!(t.level(Pressure::Hard, u64::MAX, None), Pressure::None);
    assert_eq!(t.level(Pressure::None, 5, Some(0)), Pressure::None);
}

#[test]
fn interval_adapts_to_headroom() {
    let t = Thresholds::default();
    let limit = Some(100 * GIB);
    assert_eq!(t.interval(0, limit), t.max_interval);
    assert_eq!(t.interval(50 * GIB, limit), t.max_interval);
    assert_eq!(t.interval(85 * GIB, limit), t.min_interval);
    assert_eq!(t.interval(120 * GIB, limit), t.min_interval);
    let mid = t.interval(67 * GIB + GIB / 2, limit);
    assert!(mid > t.min_interval && mid < t.max_interval, "{mid:?}");
    let later = t.interval(80 * GIB, limit);
    assert!(
        later < mid,
        "closer to the limit, sooner: {later:?} vs {mid:?}"
    );
    assert_eq!(t.interval(1, None), t.max_interval);
}

#[test]
fn thresholds_are_validated() {
    assert!(Thresholds::default().validate().is_ok());
    let bad = |f: fn(&mut Thresholds)| {
        let mut t = Thresholds::default();
        f(&mut t);
        t.validate().unwrap_err().to_string()
    };
    assert!(bad(|t| t.soft = 0.0).contains("soft level 0"));
    assert!(bad(|t| t.hard = 0.5).contains("hard level 0.5"));
    assert!(bad(|t| t.hard = 1.5).contains("hard level 1.5"));
    assert!(bad(|t| t.exit_margin = 0.9).contains("exit margin"));
    assert!(bad(|t| t.min_interval = Duration::ZERO).contains("interval"));
    assert!(bad(|t| t.max_interval = Duration::from_millis(1)).contains("interval"));
}

/// A container whose usage the test sets and the relief lowers.
#[derive(Default)]
struct World {
    usage: AtomicU64,
    idle: AtomicU64,
    trimmable: AtomicU64,
    spillable: AtomicU64,
    calls: Mutex<Vec<String>>,
    fail_reads: AtomicU64,
}

struct FakeProbe(Arc<World>, u64);

impl Probe for FakeProbe {
    fn read(&mut self) -> std::io::Result<ContainerView> {
        if self.0.fail_reads.load(Ordering::SeqCst) > 0 {
            self.0.fail_reads.fetch_sub(1, Ordering::SeqCst);
            return Err(std::io::Error::other("cgroup removed"));
        }
        Ok(ContainerView {
            source: Source::CgroupV2,
            limit: Some(self.1),
            limit_from: "memory.max".into(),
            usage: self.0.usage.load(Ordering::SeqCst),
            cache: 0,
            oom_kills: Some(0),
        })
    }
}

struct FakeRelief(Arc<World>);

impl FakeRelief {
    fn free(&self, what: &str, from: &AtomicU64, cap: u64) -> u64 {
        let b = from.load(Ordering::SeqCst).min(cap);
        from.fetch_sub(b, Ordering::SeqCst);
        self.0.usage.fetch_sub(b, Ordering::SeqCst);
        self.0.calls.lock().unwrap().push(format!("{what} {b}"));
        b
    }
}

impl Relief for FakeRelief {
    fn give_back_idle(&self) -> u64 {
        self.free("idle", &self.0.idle, u64::MAX)
    }
    fn trim(&self) -> u64 {
        self.free("trim", &self.0.trimmable, u64::MAX)
    }
    fn spill(&self, bytes: u64) -> u64 {
        self.free(&format!("spill(ask {bytes})"), &self.0.spillable, bytes)
    }
    fn describe(&self) -> String {
        format!("task 1: used {}", self.0.usage.load(Ordering::SeqCst))
    }
}

fn governor(world: &Arc<World>, limit: u64) -> (Governor, &'static Published) {
    // One per test (a process keeps one in a static).
    let published: &'static Published = Box::leak(Box::new(Published::new()));
    let g = Governor::new(
        Thresholds::default(),
        Box::new(FakeProbe(world.clone(), limit)),
        Arc::new(FakeRelief(world.clone())),
        published,
    );
    (g, published)
}

fn calls(world: &World) -> Vec<String> {
    std::mem::take(&mut *world.calls.lock().unwrap())
}

#[test]
fn relief_ladder_stops_once_under_soft() {
    let world = Arc::new(World::default());
    let (mut g, published) = governor(&world, 100);
    let t0 = Instant::now();

    world.usage.store(40, Ordering::SeqCst);
    assert_eq!(g.tick(t0), Thresholds::default().max_interval);
    assert_eq!(published.pressure(), Pressure::None);
    assert!(calls(&world).is_empty());

    // 88 of 100: soft; giving idle memory back (5) is enough (83 < 85).
    world.usage.store(88, Ordering::SeqCst);
    world.idle.store(5, Ordering::SeqCst);
    world.trimmable.store(50, Ordering::SeqCst);
    g.tick(t0 + Duration::from_millis(10));
    assert_eq!(calls(&world), ["idle 5"]);
    assert_eq!(
        g.pressure(),
        Pressure::Soft,
        "83 is within the exit margin of soft"
    );
    assert_eq!(g.stats().soft_entries, 1);

    // Idle gone; the trim brings 90 -> 40: the level ends and the episode's time is recorded.
    world.usage.store(90, Ordering::SeqCst);
    g.tick(t0 + Duration::from_millis(30));
    assert_eq!(calls(&world), ["idle 0", "trim 50"]);
    assert_eq!(published.pressure(), Pressure::None);
    assert_eq!(published.usage(), 40);
    assert_eq!(published.limit(), 100);
    assert_eq!(
        g.stats().last_relief_nanos,
        20_000_000,
        "from crossing soft (10 ms) to under it (30 ms)"
    );
    assert_eq!(g.stats().hard_entries, 0);
}

#[test]
fn hard_pressure_spills_for_what_is_over_and_stays_hard_while_it_cannot() {
    let world = Arc::new(World::default());
    let (mut g, published) = governor(&world, 1000);
    let now = Instant::now();
    world.usage.store(950, Ordering::SeqCst);
    world.spillable.store(30, Ordering::SeqCst);
    g.tick(now);
    // Target: soft (850); 950 over it by 100; the spillers only had 30, then a trim.
    assert_eq!(
        calls(&world),
        ["idle 0", "trim 0", "spill(ask 100) 30", "trim 0"]
    );
    assert_eq!(
        published.pressure(),
        Pressure::Hard,
        "920 is within the exit margin of hard (930 - 30)"
    );
    assert_eq!(g.stats().hard_entries, 1);
    let forensics = g.forensics();
    assert!(
        forensics.contains("pressure hard, anonymous 950 of limit 1000 (memory.max)"),
        "{forensics}"
    );
    assert!(forensics.contains("task 1: used 950"), "{forensics}");

    // Something finished: usage falls, the level follows without relief calls.
    world.usage.store(100, Ordering::SeqCst);
    g.tick(now + Duration::from_millis(20));
    assert!(calls(&world).is_empty());
    assert_eq!(published.pressure(), Pressure::None);
    assert_eq!(g.stats().spill_bytes, 30);
    assert_eq!(g.stats().spills, 1);
}

#[test]
fn a_failed_read_keeps_the_level_and_samples_soon() {
    let world = Arc::new(World::default());
    let (mut g, published) = governor(&world, 100);
    world.usage.store(99, Ordering::SeqCst);
    g.tick(Instant::now());
    assert_eq!(published.pressure(), Pressure::Hard);
    world.fail_reads.store(1, Ordering::SeqCst);
    assert_eq!(g.tick(Instant::now()), Thresholds::default().min_interval);
    assert_eq!(published.pressure(), Pressure::Hard);
    assert_eq!(g.stats().sample_errors, 1);
}

#[test]
fn the_thread_ticks_until_stopped() {
    let world = Arc::new(World::default());
    world.usage.store(90, Ordering::SeqCst);
    world.idle.store(80, Ordering::SeqCst);
    let (g, published) = governor(&world, 100);
    let mut thread = GovernorThread::start(g).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while published.samples() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(published.samples() >= 2, "the thread samples on its own");
    assert_eq!(published.usage(), 10);
    thread.stop();
    let samples = published.samples();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(published.samples(), samples, "no sample after stop");
    assert_eq!(thread.stats().give_back_bytes, 80);
}

#[test]
fn fast_growth_samples_sooner() {
    let world = Arc::new(World::default());
    let (mut g, _) = governor(&world, 1000);
    let t0 = Instant::now();
    world.usage.store(100, Ordering::SeqCst);
    assert_eq!(g.tick(t0), Thresholds::default().max_interval);
    // 100 -> 400 in 100 ms: 3000/s; 450 to soft (850) takes 150 ms: look again in 75 ms.
    world.usage.store(400, Ordering::SeqCst);
    let next = g.tick(t0 + Duration::from_millis(100));
    assert!(
        next > Duration::from_millis(70) && next < Duration::from_millis(80),
        "{next:?}"
    );
    // Faster still: never below min_interval.
    world.usage.store(800, Ordering::SeqCst);
    assert_eq!(
        g.tick(t0 + Duration::from_millis(101)),
        Thresholds::default().min_interval
    );
    // Shrinking: the headroom's interval.
    world.usage.store(100, Ordering::SeqCst);
    assert_eq!(
        g.tick(t0 + Duration::from_millis(200)),
        Thresholds::default().max_interval
    );
}

#[test]
fn native_growth_wakes_the_thread_before_its_interval() {
    let world = Arc::new(World::default());
    world.usage.store(100, Ordering::SeqCst);
    let (g, published) = governor(&world, 1000);
    let thread = GovernorThread::start(g).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while published.samples() < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    // At 100 of 1000 the interval is 1 s; soft is at 850: half the way is 375 bytes of growth.
    assert!(!published.note_growth(300), "not yet half the way");
    assert!(
        published.note_growth(100),
        "crossed: the caller wakes the governor"
    );
    assert!(!published.note_growth(100), "once per crossing");
    let samples = published.samples();
    world.usage.store(900, Ordering::SeqCst);
    thread.waker().wake();
    let woke = Instant::now();
    while published.samples() == samples && woke.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        woke.elapsed() < Duration::from_millis(900),
        "sampled at once, not after the 1 s interval: {:?}",
        woke.elapsed()
    );
    assert_eq!(published.pressure(), Pressure::Soft);
}

#[test]
fn a_round_that_freed_nothing_is_not_repeated_every_sample() {
    let world = Arc::new(World::default());
    let (mut g, _) = governor(&world, 1000);
    let t0 = Instant::now();
    world.usage.store(950, Ordering::SeqCst);
    g.tick(t0);
    assert_eq!(calls(&world), ["idle 0", "trim 0", "spill(ask 100) 0"]);
    // Nothing could be freed: 20 ms later, same usage: no round.
    g.tick(t0 + Duration::from_millis(20));
    assert!(calls(&world).is_empty());
    // Usage rose by over 1% of the limit: a round again.
    world.usage.store(962, Ordering::SeqCst);
    g.tick(t0 + Duration::from_millis(40));
    assert_eq!(calls(&world).len(), 3);
    // Or after max_interval.
    g.tick(t0 + Duration::from_millis(60));
    assert!(calls(&world).is_empty());
    g.tick(t0 + Duration::from_millis(1100));
    assert_eq!(calls(&world).len(), 3);
    // A round that freed something is repeated at the next sample.
    world.spillable.store(5, Ordering::SeqCst);
    g.tick(t0 + Duration::from_millis(2200));
    assert_eq!(calls(&world).len(), 4, "freed: a trim follows the spill");
    g.tick(t0 + Duration::from_millis(2220));
    assert_eq!(
        calls(&world).len(),
        3,
        "the last round freed 5 bytes: another one"
    );
}
