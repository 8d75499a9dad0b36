//! The one error type of the crate, and the builder of the out-of-memory error.
//!
//! Every fallible call returns [`MemoryError`]. Out-of-memory is built in one place
//! ([`OutOfMemory`]) so every such error reads the same way: what was asked, for whom, which pool
//! refused and why, then the whole usage tree with the top consumers, in human units.

use std::fmt;

use crate::report::UsageReport;
use crate::units::human;

/// Error a [`ReservationListener`](crate::ReservationListener) returns. It is kept intact (boxed)
/// so a binding can recover its own error type, e.g. a Java exception to rethrow as the cause.
pub type ListenerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias of this crate.
pub type Result<T, E = MemoryError> = std::result::Result<T, E>;

/// Everything that can go wrong in the memory manager.
///
/// Non-exhaustive: new kinds may be added; match with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// A request could not be satisfied by pool limits, the listener and spilling together.
    #[error("{0}")]
    OutOfMemory(Box<OutOfMemory>),
    /// A size, name, path or alignment the API does not accept; nothing changed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The manager was closed; no memory can be obtained from it any more.
    #[error("memory manager '{manager}' is closed")]
    Closed {
        /// Name of the manager.
        manager: String,
    },
    /// The listener failed (in Java: threw). The source is kept as is.
    #[error("reservation listener failed to {op} {bytes} bytes: {source}")]
    Listener {
        /// `reserve` or `unreserve`.
        op: &'static str,
        /// Bytes the call was about.
        bytes: u64,
        /// What the listener returned.
        #[source]
        source: ListenerError,
    },
    /// The listener broke its contract (e.g. granted more than asked). What it granted is still
    /// accounted for and will be given back.
    #[error("reservation listener broke its contract: {0}")]
    ListenerContract(String),
    /// A spiller failed while freeing memory. The spiller's own error is kept as the source (a
    /// binding can find a Java exception in it).
    #[error("spiller '{spiller}' failed: {source}")]
    Spill {
        /// Name the spiller was registered under.
        spiller: String,
        /// What the spiller returned.
        #[source]
        source: ListenerError,
    },
    /// `free` of a pointer this manager did not allocate, or freed already.
    #[error("pointer {addr:#x} is not a live allocation of memory manager '{manager}'")]
    UnknownAllocation {
        /// The address passed in.
        addr: usize,
        /// Name of the manager.
        manager: String,
    },
}

impl MemoryError {
    /// True for [`MemoryError::OutOfMemory`].
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, MemoryError::OutOfMemory(_))
    }
}

/// Why a request was refused.
///
/// Non-exhaustive: new reasons may be added; match with a wildcard arm.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OomReason {
    /// A pool's limit would have been exceeded.
    PoolLimit {
        /// Path of the pool whose limit was hit.
        pool: String,
        /// Its limit, bytes.
        limit: u64,
        /// Its usage at the time, bytes.
        used: u64,
    },
    /// The listener (the JVM) granted less than needed, even after spilling.
    ListenerDenied {
        /// Bytes asked of the listener.
        requested: u64,
        /// Bytes it granted.
        granted: u64,
    },
    /// The system allocator returned null.
    SystemAllocator,
    /// The manager's [`GrowGate`](crate::GrowGate) refused new memory (e.g. container pressure),
    /// and spilling did not free enough.
    Gate {
        /// The gate's reason, with its figures.
        reason: String,
    },
}

impl fmt::Display for OomReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OomReason::PoolLimit { pool, limit, used } => write!(
                f,
                "pool '{pool}' would exceed its limit of {} (used {})",
                human(*limit),
                human(*used)
            ),
            OomReason::ListenerDenied { requested, granted } => write!(
                f,
                "the reservation listener granted {} of the {} asked, after spilling",
                human(*granted),
                human(*requested)
            ),
            OomReason::SystemAllocator => write!(f, "the system allocator returned null"),
            OomReason::Gate { reason } => write!(f, "{reason}, even after spilling"),
        }
    }
}

/// Details of an out-of-memory error: the request, the refusal, and the usage at that moment.
#[derive(Clone, Debug)]
pub struct OutOfMemory {
    /// Name of the consumer that asked.
    pub consumer: String,
    /// Path of the pool it asked in.
    pub pool: String,
    /// Bytes asked.
    pub requested: u64,
    /// Why it was refused.
    pub reason: OomReason,
    /// The usage tree when it was refused.
    pub report: UsageReport,
}

impl fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Failed to reserve {} for consumer '{}' in pool '{}': {}.",
            human(self.requested),
            self.consumer,
            self.pool,
            self.reason
        )?;
        write!(f, "{}", self.report)
    }
}

impl From<OutOfMemory> for MemoryError {
    fn from(oom: OutOfMemory) -> Self {
        MemoryError::OutOfMemory(Box::new(oom))
    }
}

/// Runs a call-out to a listener or a spiller: a panic becomes an error (`panicked: <message>`),
/// so the caller undoes its bookkeeping (pool charges, claims, busy flags) as for any failure.
pub(crate) fn contain<T>(
    f: impl FnOnce() -> std::result::Result<T, ListenerError>,
) -> std::result::Result<T, ListenerError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic with a non-string payload".to_string());
        Err(format!("panicked: {text}").into())
    })
}
