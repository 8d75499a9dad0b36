//! What the DataFusion pool needs from nativemem, and its two implementations: over
//! `nativemem-core` (an engine embedding nativemem, no JVM) and over `nativemem-client` (an
//! engine in its own library, using a manager Java created). The pool itself
//! ([`NativememPool`](crate::NativememPool)) is written once, against this trait.

use std::fmt;

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
}

/// A reservation of a [`NativePool`]: accounting only, released on drop.
pub trait NativeReservation: Send + Sync + 'static {
    /// Grows by `bytes` (may reserve from Spark and spill native consumers). On error nothing
    /// changed.
    fn try_grow(&self, bytes: u64) -> Result<(), NativeError>;
    /// Shrinks by `bytes` (at most the size).
    fn shrink(&self, bytes: u64) -> Result<(), NativeError>;
    /// Bytes held.
    fn size(&self) -> u64;
}

#[cfg(feature = "core")]
mod core_backend {
    use super::*;
    use nativemem_core::{MemoryError, Pool, Reservation};

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
    }

    impl NativeReservation for Reservation {
        fn try_grow(&self, bytes: u64) -> Result<(), NativeError> {
            Reservation::try_grow(self, bytes).map_err(native)
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
    use nativemem_client::{Error, Lease, Pool, Reservation};

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
            })
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

        fn usage_report(&self) -> String {
            self.report
                .usage_report()
                .unwrap_or_else(|e| format!("(no usage report: {e})"))
        }
    }

    impl NativeReservation for Reservation {
        fn try_grow(&self, bytes: u64) -> Result<(), NativeError> {
            Reservation::try_grow(self, bytes).map_err(native)
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
