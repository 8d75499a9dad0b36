//! What the DataFusion pool needs from nativemem, and its two implementations: over
//! `nativemem-core` (an engine embedding nativemem, no JVM) and over `nativemem-client` (an
//! engine in its own library, using a manager Java created). The pool itself
//! ([`NativememPool`](crate::NativememPool)) is written once, against this trait.

use std::fmt;
use std::sync::Arc;

/// Why nativemem refused or failed a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeError {
    /// True when it is out-of-memory (limits, Spark and spilling together could not provide the
    /// bytes; nothing changed). Anything else is a failure of another kind (a closed manager, a
    /// listener that failed).
    pub out_of_memory: bool,
    /// nativemem's message; for out-of-memory, the request and the usage report.
    pub message: String,
}

impl fmt::Display for NativeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// What a [`NativememPool`](crate::NativememPool) registers with nativemem to hear when the task
/// is asked for memory (see [`NativememPool::answer_spill_requests`](crate::NativememPool::answer_spill_requests)).
pub trait SpillRequests: Send + Sync + 'static {
    /// Bytes the spillable consumers that were not asked yet hold.
    fn spillable_bytes(&self) -> u64;
    /// Asks consumers for `target` bytes back; returns the bytes freed *now* (DataFusion
    /// operators spill only in their own `try_grow`, so this is 0: the bytes come back when they
    /// spill, through their shrinks).
    fn request(&self, target: u64) -> u64;
}

/// Keeps a [`SpillRequests`] registered with nativemem; unregisters it on drop.
pub type SpillRegistration = Box<dyn Send + Sync>;

/// A nativemem pool the DataFusion consumers of one task charge.
pub trait NativePool: Send + Sync + 'static {
    /// One DataFusion consumer's claim on the pool.
    type Reservation: NativeReservation;

    /// A new, empty reservation for `consumer` (its name shows in nativemem's report and errors).
    fn new_reservation(&self, consumer: &str) -> Result<Self::Reservation, NativeError>;

    /// The byte limit that bounds this pool: its own or the task's, the smaller; `None` when
    /// only Spark's budget (the listener) bounds it.
    fn limit(&self) -> Option<u64>;

    /// nativemem's usage report of the task (pool tree, consumers), for errors and `Display`.
    fn usage_report(&self) -> String;

    /// The task (manager) this pool belongs to, unique in the process while it lives, if known:
    /// the `NativememPool`s of one task share the wait of a merge for the consumers asked to
    /// spill (see the crate docs). `None`: each pool waits for its own consumers only.
    fn task(&self) -> Option<u64> {
        None
    }

    /// Reserves from Spark (the listener), now, the task's over-commit its reserve does not
    /// cover, whatever the task limit (nativemem's `MemoryManager::cover_overcommit`): what
    /// DataFusion holds through infallible grows then shows in Spark's reservation at once.
    /// Returns the bytes granted. Both backends implement it (the core's call; `ClientPool`: the
    /// engine ABI's `manager_cover_overcommit`, through the lease it keeps). The default (a
    /// backend that cannot) grants nothing: the over-commit is reserved by the task's next grow
    /// that reaches Spark.
    fn cover_overcommit(&self) -> Result<u64, NativeError> {
        Ok(0)
    }

    /// Registers `requests` as a spiller of this pool: nativemem calls it when Spark asks the
    /// task for memory, or when a grow of the task finds no room.
    fn register_spill_requests(
        &self,
        name: &str,
        requests: Arc<dyn SpillRequests>,
    ) -> Result<SpillRegistration, NativeError>;
}

/// A reservation of a [`NativePool`]: accounting only, released on drop.
pub trait NativeReservation: Send + Sync + 'static {
    /// Grows by `bytes` (may reserve from Spark and spill native consumers). On error nothing
    /// changed.
    fn try_grow(&self, bytes: u64) -> Result<(), NativeError>;
    /// Grows by `bytes` at once whatever the limits and the cushion (nativemem's forced charge:
    /// never calls Spark or a spiller); returns the over-committed part, which nativemem counts
    /// and the task's next fallible grow pays (a pool pushed over its limit refuses grows until
    /// enough is released). Errors (nothing changes): a closed manager, an engine ABI without it.
    fn force_grow(&self, bytes: u64) -> Result<u64, NativeError>;
    /// Shrinks by `bytes` (at most the size).
    fn shrink(&self, bytes: u64) -> Result<(), NativeError>;
    /// Bytes held.
    fn size(&self) -> u64;
}

#[cfg(feature = "core")]
mod core_backend {
    use super::*;
    use nativemem_core::{MemoryError, Pool, Reservation, Spiller};

    struct CoreSpiller(Arc<dyn SpillRequests>);

    impl Spiller for CoreSpiller {
        fn spillable_bytes(&self) -> u64 {
            self.0.spillable_bytes()
        }
        fn spill(&self, target: u64) -> nativemem_core::Result<u64> {
            Ok(self.0.request(target))
        }
    }

    fn native(e: MemoryError) -> NativeError {
        NativeError {
            out_of_memory: e.is_out_of_memory(),
            message: e.to_string(),
        }
    }

    impl NativePool for Pool {
        type Reservation = Reservation;

        fn new_reservation(&self, consumer: &str) -> Result<Reservation, NativeError> {
            Ok(self.reservation(consumer))
        }

        fn limit(&self) -> Option<u64> {
            let task = self.manager().config().task_limit;
            match (self.limit(), task) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }

        fn usage_report(&self) -> String {
            self.manager().usage_report().to_string()
        }

        fn task(&self) -> Option<u64> {
            Some(self.manager().id())
        }

        fn cover_overcommit(&self) -> Result<u64, NativeError> {
            self.manager().cover_overcommit().map_err(native)
        }

        fn register_spill_requests(
            &self,
            name: &str,
            requests: Arc<dyn SpillRequests>,
        ) -> Result<SpillRegistration, NativeError> {
            Ok(Box::new(
                self.register_spiller(name, Arc::new(CoreSpiller(requests))),
            ))
        }
    }

    impl NativeReservation for Reservation {
        fn try_grow(&self, bytes: u64) -> Result<(), NativeError> {
            Reservation::try_grow(self, bytes).map_err(native)
        }

        fn force_grow(&self, bytes: u64) -> Result<u64, NativeError> {
            Reservation::force_grow(self, bytes).map_err(native)
        }

        fn shrink(&self, bytes: u64) -> Result<(), NativeError> {
            Reservation::shrink(self, bytes).map_err(native)
        }

        fn size(&self) -> u64 {
            Reservation::size(self)
        }
    }
}

#[cfg(feature = "client")]
mod client_backend {
    use super::*;
    use nativemem_client::{BoxError, Error, Lease, Pool, Reservation, Spiller};

    struct ClientSpiller(Arc<dyn SpillRequests>);

    impl Spiller for ClientSpiller {
        fn spillable_bytes(&self) -> u64 {
            self.0.spillable_bytes()
        }
        fn spill(&self, target: u64) -> std::result::Result<u64, BoxError> {
            Ok(self.0.request(target))
        }
    }

    fn native(e: Error) -> NativeError {
        NativeError {
            out_of_memory: e.is_out_of_memory(),
            message: e.message,
        }
    }

    /// A pool of a manager reached through the engine ABI (`nativemem-client`), with what the
    /// DataFusion pool needs to know about it read once: its limit and the task's.
    pub struct ClientPool {
        pool: Pool,
        report: Lease,
        limit: Option<u64>,
        task: Option<u64>,
    }

    impl ClientPool {
        /// The pool at `path` (created if missing, with `limit` if given) of the manager `lease`
        /// pins. The pool keeps the lease for the usage report: build it per query (or per
        /// partition stream), not for the life of the task, since a held lease delays the
        /// manager's close.
        pub fn open(
            lease: Lease,
            path: &str,
            limit: Option<u64>,
        ) -> nativemem_client::Result<Self> {
            let pool = lease.pool(path, limit)?;
            let own = pool.stats()?.limit;
            let task = lease.pool("", None)?.stats()?.limit;
            let limit = match (own, task) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            Ok(ClientPool {
                pool,
                report: lease,
                limit,
                task: None,
            })
        }

        /// Marks the pool as one of the task whose manager handle (as Java passed it) is
        /// `manager`: the `NativememPool`s opened with the same handle share the wait of a merge
        /// for the consumers asked to spill, whichever pool they are in (a task with several
        /// pools). Without it each pool waits for its own consumers only.
        pub fn in_task(mut self, manager: i64) -> Self {
            // Tagged apart from the core backend's manager ids (a process may use both).
            self.task = Some((manager as u64) | (1 << 63));
            self
        }
    }

    impl NativePool for ClientPool {
        type Reservation = Reservation;

        fn new_reservation(&self, consumer: &str) -> Result<Reservation, NativeError> {
            self.pool.reservation(consumer).map_err(native)
        }

        fn limit(&self) -> Option<u64> {
            self.limit
        }

        fn task(&self) -> Option<u64> {
            self.task
        }

        fn usage_report(&self) -> String {
            self.report
                .usage_report()
                .unwrap_or_else(|e| format!("(no usage report: {e})"))
        }

        /// The engine ABI's `manager_cover_overcommit`, through the lease the pool keeps (it
        /// pins the task's manager whether or not the pool was opened [`in_task`](Self::in_task)).
        /// A library older than the call grants nothing (`Ok(0)`).
        fn cover_overcommit(&self) -> Result<u64, NativeError> {
            self.report.cover_overcommit().map_err(native)
        }

        fn register_spill_requests(
            &self,
            name: &str,
            requests: Arc<dyn SpillRequests>,
        ) -> Result<SpillRegistration, NativeError> {
            let registration = self
                .pool
                .register_spiller(name, Arc::new(ClientSpiller(requests)))
                .map_err(native)?;
            Ok(Box::new(registration))
        }
    }

    impl NativeReservation for Reservation {
        fn try_grow(&self, bytes: u64) -> Result<(), NativeError> {
            Reservation::try_grow(self, bytes).map_err(native)
        }

        fn force_grow(&self, bytes: u64) -> Result<u64, NativeError> {
            Reservation::force_grow(self, bytes).map_err(native)
        }

        fn shrink(&self, bytes: u64) -> Result<(), NativeError> {
            Reservation::shrink(self, bytes).map_err(native)
        }

        fn size(&self) -> u64 {
            Reservation::size(self).unwrap_or(0)
        }
    }
}

#[cfg(feature = "client")]
pub use client_backend::ClientPool;
