//! Test support: the table of the provider linked into the test binary (`nativemem-provider`,
//! a dev-dependency), managers made with
//! [`Api::create_manager`] over a capacity-limited listener, and a [`Competitor`] that makes the
//! manager spill from another consumer of the task.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nativemem_client::{Api, BoxError, Listener, ManagerOptions, OwnedManager, Reservation};

/// The provider's table.
pub(crate) fn api() -> Api {
    let table = nativemem_provider::api(nativemem_client::sys::NM_ABI_VERSION);
    // SAFETY: the provider's table is a static of the linked library.
    unsafe { Api::from_ptr(table) }.expect("the provider's table passes the check")
}

/// A listener with a capacity (Spark's share of the task, in bytes) that counts what it granted
/// and refuses to take back more. SeqCst: tests read the count across threads.
pub(crate) struct TestListener {
    capacity: u64,
    held: AtomicU64,
    given_back: AtomicU64,
}

impl TestListener {
    pub(crate) fn new(capacity: u64) -> Arc<TestListener> {
        Arc::new(TestListener {
            capacity,
            held: AtomicU64::new(0),
            given_back: AtomicU64::new(0),
        })
    }

    pub(crate) fn unlimited() -> Arc<TestListener> {
        TestListener::new(u64::MAX)
    }

    /// Bytes granted and not given back.
    pub(crate) fn reserved(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    /// Bytes given back so far.
    pub(crate) fn given_back(&self) -> u64 {
        self.given_back.load(Ordering::SeqCst)
    }
}

impl Listener for TestListener {
    fn reserve(&self, bytes: u64) -> Result<u64, BoxError> {
        let mut granted = 0;
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                granted = bytes.min(self.capacity - held);
                Some(held + granted)
            })
            .map_err(|_| "test listener: counter update failed")?;
        Ok(granted)
    }

    fn unreserve(&self, bytes: u64) -> Result<(), BoxError> {
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                held.checked_sub(bytes)
            })
            .map(|_| {
                self.given_back.fetch_add(bytes, Ordering::SeqCst);
            })
            .map_err(|held| format!("test listener: {bytes} given back but {held} held").into())
    }
}

/// A manager of the provider whose memory comes from `listener`.
pub(crate) fn manager_with(
    name: &str,
    options: ManagerOptions,
    listener: Arc<dyn Listener>,
) -> OwnedManager {
    api()
        .create_manager(name, options, Some(listener))
        .expect("create_manager")
}

/// Another consumer of the same task: what makes the manager spill the task's spillers from
/// outside an operator. (Spark asks through Java's `NativeMemoryManager.spill` /
/// `releaseAndSpill`, for which the engine ABI has no function; an engine's own tests reach the
/// same spills through another consumer's grow that does not fit the task's limits.)
pub(crate) struct Competitor {
    reservation: Reservation,
}

impl Competitor {
    /// A consumer of the pool `competitor` of the manager `manager`.
    pub(crate) fn new(manager: i64) -> Competitor {
        let lease = api().acquire(manager).expect("acquire");
        let pool = lease.pool("competitor", None).expect("pool");
        let reservation = pool.reservation("Competitor").expect("reservation");
        Competitor { reservation }
    }

    /// Takes `bytes` (the manager spills the task's spillers if they do not fit its limits),
    /// then gives them back.
    pub(crate) fn demand(&self, bytes: u64) -> nativemem_client::Result<()> {
        self.reservation.try_grow(bytes)?;
        self.reservation.free()?;
        Ok(())
    }
}
