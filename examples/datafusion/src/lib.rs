//! # nativemem-df-engine: DataFusion inside Spark tasks, on the task's nativemem manager
//!
//! A Comet-style engine in its own shared library (`libnativemem_df_engine.so`): it runs
//! DataFusion queries for a Spark task and reaches the task's manager only through the engine ABI
//! (`nativemem-client`), whose table address and manager handle Java passes as two `long`s. Its
//! DataFusion `MemoryPool` is `NativememPool` over a `ClientPool` (`nativemem-datafusion`): every DataFusion consumer
//! is a reservation of the task's pool tree, blocks come from Spark through the task's
//! `MemoryConsumer`, and with `NativememPool::answer_spill_requests` **Spark can make DataFusion
//! spill**: when another consumer of the task asks Spark for memory, Spark asks nativemem's
//! consumer, nativemem hands back its cushion and asks this pool, which refuses the next
//! `try_grow` of the largest spillable DataFusion consumers so that they spill; what they free
//! goes back to Spark through their shrinks.
//!
//! ```text
//!  DataFusionTask (Java)           this library                         nativemem (other .so)
//!  ─────────────────────           ────────────                         ─────────────────────
//!  open(mm, pool, partitions) ──▶ Task in a handle table (kind tag 64)
//!  start(query, rows) ──────────▶ lease + ClientPool + NativememPool ──▶ pool "datafusion"
//!                                  query spawned on the engine's tokio
//!                                  runtime (2 workers, shared per JVM)
//!                                  DataFusion try_grow/shrink ─────────▶ reservations, blocks
//!                                                                         from Spark, spill requests
//!  await() ─────────────────────▶ blocks until the query ends: stats
//!  close() ─────────────────────▶ cancels a running query, waits, drops the pool (the lease
//!                                  goes: the manager can close)
//! ```
//!
//! For comparison only (never what an engine should do), a task opened with a Spark
//! `MemoryConsumer` uses [`PerCallPool`] instead: Comet's design, one JNI call into Spark per
//! `try_grow`/`grow` and per `shrink`, and a consumer whose `spill` returns 0, so Spark cannot get
//! memory back from DataFusion.
//!
//! Every export catches panics and maps errors to one Java exception each (see [`java`]).

mod java;
mod per_call;
mod query;

pub use per_call::PerCallPool;
pub use query::{Outcome, Query};
