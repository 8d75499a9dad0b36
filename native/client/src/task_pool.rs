//! [`TaskPool`]: a pool of a task's memory manager as an engine's operator holds it across
//! calls, leasing the manager per call.

use std::fmt;
use std::sync::Arc;

use crate::api::Api;
use crate::error::Result;
use crate::lease::Lease;
use crate::pool::{Pool, PoolStats};

/// A pool of a task's memory manager, held by an operator for its whole life: the pool handle,
/// plus the table and the manager's handle, so each call of the operator can pin the manager
/// open with a [`Lease`] for its own span (never for the operator's life: the manager's close at
/// task end waits for held leases).
///
/// ```text
///  Java: NativeMemoryManager.nativeApi(), manager.handle()
///          ──▶ TaskPool::open(api, handle, "sort", limit)
///  each call of the operator:  pool.lease()  … touch memory of the pool …  drop(lease)
/// ```
///
/// Cheap to clone (the pool handle is shared); `Send + Sync`.
#[derive(Clone)]
pub struct TaskPool {
    api: Api,
    manager: i64,
    pool: Arc<Pool>,
}

impl TaskPool {
    /// Opens the pool at `path` below the task's root (`""` is the root) of the manager
    /// `manager` (the `long` Java's `NativeMemoryManager.handle()` returns), creating it with a
    /// limit of `limit` bytes if it does not exist. Takes a lease for the span of the call.
    ///
    /// Errors: those of [`Api::acquire`] (the manager is closed, the handle is not a manager's)
    /// and of [`Lease::pool`] (a bad path, an existing pool asked for another limit).
    pub fn open(api: Api, manager: i64, path: &str, limit: Option<u64>) -> Result<TaskPool> {
        let lease = api.acquire(manager)?;
        let pool = lease.pool(path, limit)?;
        lease.release()?;
        Ok(TaskPool::new(api, manager, pool))
    }

    /// A pool the caller opened on the manager `manager`.
    pub fn new(api: Api, manager: i64, pool: Pool) -> TaskPool {
        TaskPool {
            api,
            manager,
            pool: Arc::new(pool),
        }
    }

    /// The table.
    pub fn api(&self) -> Api {
        self.api
    }

    /// The manager's handle (as Java passes it).
    pub fn manager(&self) -> i64 {
        self.manager
    }

    /// The pool handle.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The path the pool was opened with.
    pub fn path(&self) -> &str {
        self.pool.path()
    }

    /// Pins the manager open for a span of work; fails once it is closing or closed.
    pub fn lease(&self) -> Result<Lease> {
        self.api.acquire(self.manager)
    }

    /// used / peak / limit of the pool, in bytes.
    pub fn stats(&self) -> Result<PoolStats> {
        self.pool.stats()
    }
}

impl fmt::Debug for TaskPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskPool")
            .field("manager", &self.manager)
            .field("pool", &self.pool)
            .finish()
    }
}
