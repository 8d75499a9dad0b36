//! Model check of the lock-free handle table with loom: every interleaving (up to the preemption
//! bound) of pins, releases, removals, inserts and the close protocol the provider builds on
//! them (a flag read after a pin against the pins read after the flag; WATCH for a deferred
//! close) keeps an object alive under every pin, drops it exactly once, admits no call unseen by
//! a close, and leaves no deferred close unfinished.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p nativemem-handles --test loom --release`
//! (scripts/test.sh, suite `cargo-loom`, runs it with the core's model).
#![cfg(loom)]

use std::sync::Arc;

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::thread;
use nativemem_handles::{kind, HandleError, HandleTable};

/// An object that records its drop, so a use after it shows up as an assertion.
struct Object {
    dropped: Arc<AtomicBool>,
    drops: Arc<AtomicUsize>,
}

impl Object {
    fn new(drops: &Arc<AtomicUsize>) -> Arc<Object> {
        Arc::new(Object {
            dropped: Arc::new(AtomicBool::new(false)),
            drops: drops.clone(),
        })
    }

    fn use_it(&self) {
        assert!(
            !self.dropped.load(Ordering::SeqCst),
            "used after it was dropped"
        );
    }
}

impl Drop for Object {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

fn table() -> Arc<HandleTable<Object>> {
    Arc::new(HandleTable::new(kind::POOL, "pool"))
}

#[test]
fn a_pin_racing_a_removal_never_sees_the_object_dropped() {
    loom::model(|| {
        let t = table();
        let drops = Arc::new(AtomicUsize::new(0));
        let h = t.insert(Object::new(&drops)).unwrap();
        let t2 = t.clone();
        let user = thread::spawn(move || match t2.pin(h) {
            Ok(p) => {
                p.use_it();
                p.release();
            }
            Err(e) => assert!(matches!(e, HandleError::Stale { .. }), "{e}"),
        });
        let removed = t.remove(h).unwrap();
        removed.use_it();
        drop(removed);
        user.join().unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 1, "dropped exactly once");
        assert_eq!(t.in_flight(h), 0);
        assert_eq!(t.live(), 0);
    });
}

#[test]
fn two_pins_and_a_removal_reclaim_once_and_the_slot_is_reused() {
    loom::model(|| {
        let t = table();
        let drops = Arc::new(AtomicUsize::new(0));
        let h = t.insert(Object::new(&drops)).unwrap();
        let user = {
            let t = t.clone();
            thread::spawn(move || {
                if let Ok(p) = t.pin(h) {
                    p.use_it();
                }
            })
        };
        let remover = {
            let t = t.clone();
            thread::spawn(move || drop(t.remove(h)))
        };
        if let Ok(p) = t.pin(h) {
            p.use_it();
        }
        user.join().unwrap();
        remover.join().unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        assert_eq!(t.in_flight(h), 0);
        // The slot is free again: reused, with a new generation.
        let h2 = t.insert(Object::new(&drops)).unwrap();
        assert_eq!(h2 as u64 & 0xff_ffff, h as u64 & 0xff_ffff);
        assert_ne!(h2, h);
        assert!(t.pin(h).is_err());
        t.pin(h2).unwrap().use_it();
    });
}

/// The provider's admission: a call pins, then reads the close flag; a close sets the flag, then
/// waits for the pins to drain before it "runs" (frees). No admitted call may see the close run.
#[test]
fn a_close_never_runs_under_an_admitted_call() {
    loom::model(|| {
        let t = table();
        let drops = Arc::new(AtomicUsize::new(0));
        let h = t.insert(Object::new(&drops)).unwrap();
        let closing = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicBool::new(false));
        let caller = {
            let (t, closing, closed) = (t.clone(), closing.clone(), closed.clone());
            thread::spawn(move || {
                let Ok(p) = t.pin(h) else { return };
                if !closing.load(Ordering::SeqCst) {
                    // Admitted: the close must not have run, and must not run until released.
                    assert!(
                        !closed.load(Ordering::SeqCst),
                        "admitted after the close ran"
                    );
                    p.use_it();
                    assert!(!closed.load(Ordering::SeqCst), "the close ran under a call");
                }
                p.release();
            })
        };
        closing.store(true, Ordering::SeqCst);
        while t.in_flight(h) != 0 {
            thread::yield_now();
        }
        closed.store(true, Ordering::SeqCst);
        drop(t.remove(h).unwrap());
        caller.join().unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    });
}

/// A deferred close, as the provider runs it: the closer sets CLOSING, gives up waiting (here: at
/// once), watches the slot if it is busy, flags the deferral and tries to finish; finishing is
/// "nothing in flight, set RUNNING, nothing in flight still, claim". A call pins, reads the flags
/// (a give-back is admitted while CLOSING until RUNNING), marks its slot if it saw CLOSING, and
/// the release that reports a watch tries to finish if it sees the deferral. The close runs
/// exactly once, never while an admitted call is in flight.
#[test]
fn a_deferred_close_is_finished_exactly_once_with_nothing_in_flight() {
    loom::model(|| {
        let t = table();
        let drops = Arc::new(AtomicUsize::new(0));
        let h = t.insert(Object::new(&drops)).unwrap();
        let closing = Arc::new(AtomicBool::new(false));
        let running = Arc::new(AtomicBool::new(false));
        let deferred = Arc::new(AtomicBool::new(false));
        let runs = Arc::new(AtomicUsize::new(0));
        let claimed = Arc::new(AtomicBool::new(false));
        let finish = {
            let (t, running, runs, claimed) =
                (t.clone(), running.clone(), runs.clone(), claimed.clone());
            move || {
                if t.in_flight(h) != 0 {
                    return;
                }
                running.store(true, Ordering::SeqCst);
                if t.in_flight(h) == 0 && !claimed.swap(true, Ordering::SeqCst) {
                    runs.fetch_add(1, Ordering::SeqCst);
                }
            }
        };
        let caller = {
            let (t, closing, running, deferred, runs, finish) = (
                t.clone(),
                closing.clone(),
                running.clone(),
                deferred.clone(),
                runs.clone(),
                finish.clone(),
            );
            thread::spawn(move || {
                let Ok(p) = t.pin(h) else { return };
                let is_closing = closing.load(Ordering::SeqCst);
                let admitted = !is_closing || !running.load(Ordering::SeqCst);
                if is_closing {
                    p.watch();
                }
                if admitted {
                    p.use_it();
                    assert_eq!(runs.load(Ordering::SeqCst), 0, "closed under a call");
                }
                if p.release() && deferred.load(Ordering::SeqCst) {
                    finish();
                }
            })
        };
        // The closer.
        closing.store(true, Ordering::SeqCst);
        t.watch(h);
        deferred.store(true, Ordering::SeqCst);
        finish();
        caller.join().unwrap();
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "the deferred close ran once"
        );
    });
}
