//! # nativemem-provider: the registry and the engine ABI table
//!
//! The process-wide state behind nativemem's handles, and the C function table over it: what
//! `libnativemem_jni.so` provides to Java *and* to engines in their own libraries. No JNI here:
//! the Java layer (`nativemem-jni`) is a thin set of exports over this crate, and this crate is
//! an rlib linked into that one cdylib, so the process has one copy of the tables.
//!
//! ```text
//!  Java (nativemem-jni exports) ─┐
//!                                ├──▶ registry: MANAGERS, RESERVATIONS ──▶ nativemem-core
//!  engine .so ──nm_api table──▶ abi: LEASES, POOLS, SPILLERS, STATES ─┘   (one MemoryManager
//!                                                                           per task)
//! ```
//!
//! - [`registry`]: live managers and reservations, in-flight counting, and a close that never
//!   frees under a running call or a held lease; what a manager owns in other tables and the
//!   order its close drops it in. A manager's listener comes in as
//!   `Arc<dyn ReservationListener>`: a Java one from the JNI crate, a C one from `abi`.
//! - `abi`: the versioned `nm_api` table of `include/nativemem.h` ([`api`]), its objects
//!   (leases, pools, spillers and attached state over C vtables, a C listener for
//!   `manager_create`) and the boundary rules (every body in a panic guard, errors as codes).
//! - `error`: [`Error`], its ABI status codes, and [`panic_message`].
//!
//! ## Who links this crate
//! `nativemem-jni` (the product cdylib, which exports [`api`] as the C symbol `nativemem_api`)
//! and tests that need a provider of the table without a JVM (`nativemem-client`'s, the
//! examples', ...: a `[dev-dependencies]` entry). An engine's *library* must never link it: a
//! second copy next to the JVM's has its own, empty tables (every handle from Java refused).
//! This crate exports no C symbol itself, so linking it never changes what a library exports.
//!
//! ## Rules for code added here
//! - Every function of the table runs its body in `abi::run`: no panic crosses the boundary.
//! - Reach a manager only through the registry's `with_manager` / `enter_manager` / pins, so
//!   close waits for you; record what a manager owns with `ManagerEntry::own`.
//! - No `jni` import (the test `tests/layers.rs` checks it).
//!
//! ## Modules, in layers
//! Every `use crate::…` of a module names a module below it, so the crate has no import cycle;
//! `tests/layers.rs` enforces the order below.
//!
//! ```text
//!  module     holds                                                 uses (all below it)
//!  abi        the nm_api table, C listener/spiller/state, leases    registry error
//!  governor   the executor's container governor, its relief ladder  registry container error
//!  registry   managers, reservations, calls in flight, close order  arbiter container error
//!  arbiter    executor-wide arbitration on a short grant from Spark  container
//!  container  the governor's last sample, the grow gate, live list  -
//!  error      Error, status codes, panic_message                    -
//! ```

mod abi;
pub mod arbiter;
mod container;
mod error;
pub mod governor;
pub mod registry;

pub use abi::api;
pub use error::{panic_message, Error, Result};
