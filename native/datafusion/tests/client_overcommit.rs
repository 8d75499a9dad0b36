//! Issue 26, "over-commit bounded and visible", through the engine ABI: what DataFusion takes
//! through its infallible `grow` past the task limit, on a `ClientPool` (a manager reached with
//! `nativemem-client`, as a Rust engine reaches the one Java made), is reserved from the listener
//! (Spark) at once (`manager_cover_overcommit`), not only at the next grow that reaches Spark.
//!
//! Run: `cargo test --profile datafusion -p nativemem-datafusion --test client_overcommit`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use datafusion_execution::memory_pool::{MemoryConsumer, MemoryPool};
use nativemem_client::{Api, BoxError, Listener, ManagerOptions, OwnedManager};
use nativemem_datafusion::{ClientPool, NativePool, NativememPool};

const MIB: usize = 1 << 20;

/// Spark's side: grants everything, counts what it holds and its reserve calls.
#[derive(Default)]
struct Spark {
    held: AtomicU64,
    reserve_calls: AtomicU64,
}

impl Listener for Spark {
    fn reserve(&self, bytes: u64) -> Result<u64, BoxError> {
        self.reserve_calls.fetch_add(1, Ordering::SeqCst);
        self.held.fetch_add(bytes, Ordering::SeqCst);
        Ok(bytes)
    }
    fn unreserve(&self, bytes: u64) -> Result<(), BoxError> {
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| h.checked_sub(bytes))
            .map(|_| ())
            .map_err(|h| format!("unreserve {bytes} > held {h}").into())
    }
}

impl Spark {
    fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst) as usize
    }
}

/// A manager as Java makes it (1 MiB blocks, exact accounting, a 4 MiB task limit), over the
/// provider's table, with `spark` as its listener.
fn manager(spark: &Arc<Spark>) -> (Api, OwnedManager) {
    let table = nativemem_provider::api(nativemem_client::sys::NM_ABI_VERSION);
    // SAFETY: the provider's table, a static of the linked library.
    let api = unsafe { Api::from_ptr(table) }.unwrap();
    let mm = api
        .create_manager(
            "df-client-overcommit",
            ManagerOptions {
                reservation_block: Some(MIB as u64),
                task_limit: Some(4 * MIB as u64),
                reservation_quantum: 0,
                ..ManagerOptions::default()
            },
            Some(spark.clone() as Arc<dyn Listener>),
        )
        .unwrap();
    (api, mm)
}

/// The test itself, for a pool opened `in_task` or not (the lease the pool keeps is enough).
fn infallible_grow_is_reserved_from_spark_at_once(in_task: bool) {
    let spark = Arc::new(Spark::default());
    let (api, mm) = manager(&spark);
    let mut client = ClientPool::open(api.acquire(mm.handle()).unwrap(), "datafusion", None)
        .expect("ClientPool::open");
    if in_task {
        client = client.in_task(mm.handle());
    }
    assert_eq!(client.limit(), Some(4 * MIB as u64));
    let native = Arc::new(NativememPool::new(client));
    let pool: Arc<dyn MemoryPool> = native.clone();
    let join = MemoryConsumer::new("SortMergeJoinStream[0]").register(&pool);
    let sort = MemoryConsumer::new("ExternalSorter[0]")
        .with_can_spill(true)
        .register(&pool);

    join.grow(3 * MIB);
    assert_eq!(spark.held(), 3 * MIB);
    // Past the 4 MiB limit: nativemem refuses, DataFusion's infallible grow is force-charged,
    // and Spark reserves the over-commit right away, whatever the limit.
    let calls = spark.reserve_calls.load(Ordering::SeqCst);
    join.grow(5 * MIB);
    assert_eq!(join.size(), 8 * MIB);
    assert!(native.overcommit() > 0, "the grow was not over-committed");
    assert!(
        spark.reserve_calls.load(Ordering::SeqCst) > calls,
        "Spark was not asked for the over-commit"
    );
    let lease = api.acquire(mm.handle()).unwrap();
    let stats = lease.stats().unwrap();
    assert_eq!(stats.used as usize, 8 * MIB, "{stats:?}");
    assert!(
        spark.held() >= 8 * MIB,
        "Spark holds {} MiB of the 8 MiB in use (over-commit not covered at once)",
        spark.held() / MIB
    );
    assert_eq!(spark.held(), stats.reserved as usize, "{stats:?}");
    // Covered, but still over the limit: the next fallible grow of any consumer is refused.
    assert!(sort.try_grow(1024).is_err());
    assert!(
        lease.usage_report().unwrap().contains("Over-committed"),
        "{}",
        lease.usage_report().unwrap()
    );

    drop((join, sort));
    assert_eq!(native.reserved(), 0);
    assert_eq!(lease.stats().unwrap().used, 0);
    drop(lease);
    drop(pool);
    drop(native); // releases the pool's lease
    let report = mm.close().unwrap();
    assert_eq!(report.leaked_bytes, 0, "{}", report.report);
    assert_eq!(spark.held(), 0, "Spark not paid back");
}

#[test]
fn infallible_grow_past_the_limit_is_reserved_from_spark_at_once_in_task() {
    infallible_grow_is_reserved_from_spark_at_once(true);
}

#[test]
fn infallible_grow_past_the_limit_is_reserved_from_spark_at_once_without_in_task() {
    infallible_grow_is_reserved_from_spark_at_once(false);
}
