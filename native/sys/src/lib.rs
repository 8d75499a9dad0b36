//! # nativemem-sys: the engine ABI as Rust types
//!
//! The `#[repr(C)]` mirror of `include/nativemem.h`, and nothing else: no code, no state. The
//! provider (`nativemem-provider`, which fills the table) and the consumer (`nativemem-client`, which
//! wraps it in safe types) both depend on this crate, so the layout is written once on the Rust
//! side. The header is the contract; a unit test pins the sizes and offsets C sees.
//!
//! Versioning: [`NmApi`] starts with `abi_version` and `struct_size` and only grows at the end. A
//! caller compiled against [`NM_ABI_VERSION`] `N` accepts any table with `abi_version >= N` and
//! `struct_size >= size_of::<NmApi>()` (see [`NmApi::check`]).
#![no_std]
#![allow(non_camel_case_types)]

use core::ffi::{c_char, c_void};

/// The ABI version of this crate and of `include/nativemem.h`. Additions at the end of the table
/// (the forced charges, `manager_create_with` with its [`NmManagerOptions`], the trim hooks) keep it; it
/// changes only with a new table.
pub const NM_ABI_VERSION: u32 = 1;

/// `NM_DEFAULT_RESERVATION_QUANTUM`: the reservation quantum of a manager whose creator does not
/// choose one (1 MiB): [`NmManagerOptions::default`], `manager_create`, and `manager_create_with`
/// with null options. 0 is exact accounting.
pub const NM_DEFAULT_RESERVATION_QUANTUM: u64 = 1 << 20;

/// Status code: [`NM_OK`] or one of the `NM_ERR_*` codes.
pub type nm_status = i32;
/// Success.
pub const NM_OK: nm_status = 0;
/// A size, name, path, alignment or struct_size the ABI does not accept. Nothing changed.
pub const NM_ERR_INVALID_ARGUMENT: nm_status = 1;
/// The handle named an object that was closed since.
pub const NM_ERR_STALE_HANDLE: nm_status = 2;
/// The handle is 0, of another kind, or was never issued.
pub const NM_ERR_INVALID_HANDLE: nm_status = 3;
/// The manager is closing or closed.
pub const NM_ERR_CLOSED: nm_status = 4;
/// Limits, Spark and spilling together could not provide the bytes. Nothing changed.
pub const NM_ERR_OUT_OF_MEMORY: nm_status = 5;
/// `free` of a pointer the manager did not allocate, or freed already.
pub const NM_ERR_UNKNOWN_POINTER: nm_status = 6;
/// The reservation listener (Spark) failed.
pub const NM_ERR_LISTENER: nm_status = 7;
/// A spiller callback failed while freeing memory for the request.
pub const NM_ERR_SPILL: nm_status = 8;
/// Not supported by this library (e.g. a newer ABI version).
pub const NM_ERR_UNSUPPORTED: nm_status = 9;
/// Close: calls or leases still held at the time limit; memory is freed when they end.
pub const NM_ERR_TIMEOUT: nm_status = 10;
/// A bug inside nativemem was caught at the boundary.
pub const NM_ERR_INTERNAL: nm_status = 11;

/// A manager (the Java handle).
pub type nm_manager = u64;
/// A manager pinned open.
pub type nm_lease = u64;
/// A handle on one pool.
pub type nm_pool = u64;
/// An accounting-only claim on a pool.
pub type nm_reservation = u64;
/// A registered spiller.
pub type nm_spiller = u64;
/// Engine state attached to a manager.
pub type nm_state = u64;

/// `nm_spiller_vtable`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NmSpillerVtable {
    pub struct_size: u32,
    pub reserved0: u32,
    pub ctx: *mut c_void,
    pub spillable_bytes: Option<unsafe extern "C" fn(ctx: *mut c_void) -> u64>,
    pub spill:
        Option<unsafe extern "C" fn(ctx: *mut c_void, target: u64, freed: *mut u64) -> nm_status>,
    pub drop: Option<unsafe extern "C" fn(ctx: *mut c_void)>,
}

/// `nm_listener`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NmListener {
    pub struct_size: u32,
    pub reserved0: u32,
    pub ctx: *mut c_void,
    pub reserve:
        Option<unsafe extern "C" fn(ctx: *mut c_void, bytes: u64, granted: *mut u64) -> nm_status>,
    pub unreserve: Option<unsafe extern "C" fn(ctx: *mut c_void, bytes: u64) -> nm_status>,
    pub drop: Option<unsafe extern "C" fn(ctx: *mut c_void)>,
}

/// `nm_manager_options`: the settings of a manager made with `manager_create_with`. Start from
/// [`NmManagerOptions::default`] (the header's `nm_manager_options_default()`), which holds every
/// default.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NmManagerOptions {
    /// `size_of::<NmManagerOptions>()` as compiled by the caller.
    pub struct_size: u32,
    /// 0.
    pub reserved0: u32,
    /// Bytes asked of the listener at a time; 0: the default (8 MiB).
    pub reservation_block: u64,
    /// Limit of the whole task in bytes; -1: none.
    pub task_limit: i64,
    /// Per-reservation slack in bytes; [`NM_DEFAULT_RESERVATION_QUANTUM`] (1 MiB) by default; 0
    /// (opt-in): exact accounting.
    pub reservation_quantum: u64,
    /// How long close waits for calls in flight and leases, in milliseconds; -1: the default
    /// (10 s).
    pub close_timeout_millis: i64,
}

impl Default for NmManagerOptions {
    fn default() -> Self {
        NmManagerOptions {
            struct_size: core::mem::size_of::<NmManagerOptions>() as u32,
            reserved0: 0,
            reservation_block: 0,
            task_limit: -1,
            reservation_quantum: NM_DEFAULT_RESERVATION_QUANTUM,
            close_timeout_millis: -1,
        }
    }
}

/// `nm_manager_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NmManagerStats {
    pub used: u64,
    pub peak: u64,
    pub reserved: u64,
    pub spill_count: u64,
    pub spilled_bytes: u64,
}

/// `nm_pool_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NmPoolStats {
    pub used: u64,
    pub peak: u64,
    pub limit: i64,
}

/// Error out-parameter of every function: `char **err`.
pub type Err = *mut *mut c_char;

/// `nm_api`: the function table. See `include/nativemem.h` for every contract.
#[repr(C)]
#[derive(Debug)]
pub struct NmApi {
    pub abi_version: u32,
    pub struct_size: u32,
    pub free_message: unsafe extern "C" fn(message: *mut c_char),

    pub acquire:
        unsafe extern "C" fn(manager: nm_manager, out: *mut nm_lease, err: Err) -> nm_status,
    pub release: unsafe extern "C" fn(lease: nm_lease, err: Err) -> nm_status,
    pub manager_stats:
        unsafe extern "C" fn(lease: nm_lease, out: *mut NmManagerStats, err: Err) -> nm_status,
    pub usage_report:
        unsafe extern "C" fn(lease: nm_lease, report: *mut *mut c_char, err: Err) -> nm_status,

    pub pool_open: unsafe extern "C" fn(
        lease: nm_lease,
        path: *const c_char,
        limit: i64,
        out: *mut nm_pool,
        err: Err,
    ) -> nm_status,
    pub pool_close: unsafe extern "C" fn(pool: nm_pool, err: Err) -> nm_status,
    pub pool_stats:
        unsafe extern "C" fn(pool: nm_pool, out: *mut NmPoolStats, err: Err) -> nm_status,

    pub reservation_new: unsafe extern "C" fn(
        pool: nm_pool,
        consumer: *const c_char,
        out: *mut nm_reservation,
        err: Err,
    ) -> nm_status,
    pub reservation_try_grow:
        unsafe extern "C" fn(r: nm_reservation, bytes: u64, err: Err) -> nm_status,
    pub reservation_shrink:
        unsafe extern "C" fn(r: nm_reservation, bytes: u64, err: Err) -> nm_status,
    pub reservation_try_resize:
        unsafe extern "C" fn(r: nm_reservation, new_size: u64, err: Err) -> nm_status,
    pub reservation_size:
        unsafe extern "C" fn(r: nm_reservation, out: *mut u64, err: Err) -> nm_status,
    pub reservation_free:
        unsafe extern "C" fn(r: nm_reservation, freed: *mut u64, err: Err) -> nm_status,
    pub reservation_close: unsafe extern "C" fn(r: nm_reservation, err: Err) -> nm_status,

    pub allocate: unsafe extern "C" fn(
        pool: nm_pool,
        size: u64,
        align: u64,
        out: *mut *mut c_void,
        err: Err,
    ) -> nm_status,
    pub free: unsafe extern "C" fn(
        pool: nm_pool,
        ptr: *mut c_void,
        size: *mut u64,
        err: Err,
    ) -> nm_status,

    pub spiller_register: unsafe extern "C" fn(
        pool: nm_pool,
        name: *const c_char,
        vtable: *const NmSpillerVtable,
        out: *mut nm_spiller,
        err: Err,
    ) -> nm_status,
    pub spiller_unregister: unsafe extern "C" fn(spiller: nm_spiller, err: Err) -> nm_status,

    pub attach: unsafe extern "C" fn(
        lease: nm_lease,
        state: *mut c_void,
        drop: Option<unsafe extern "C" fn(state: *mut c_void)>,
        out: *mut nm_state,
        err: Err,
    ) -> nm_status,
    pub detach: unsafe extern "C" fn(handle: nm_state, run_drop: i32, err: Err) -> nm_status,

    pub manager_create: unsafe extern "C" fn(
        name: *const c_char,
        reservation_block: u64,
        task_limit: i64,
        listener: *const NmListener,
        out: *mut nm_manager,
        err: Err,
    ) -> nm_status,
    pub manager_close: unsafe extern "C" fn(
        manager: nm_manager,
        leak_report: *mut *mut c_char,
        leaked_bytes: *mut u64,
        err: Err,
    ) -> nm_status,

    pub manager_spill:
        unsafe extern "C" fn(lease: nm_lease, target: u64, freed: *mut u64, err: Err) -> nm_status,
    pub manager_reclaim: unsafe extern "C" fn(
        lease: nm_lease,
        target: u64,
        returned: *mut u64,
        err: Err,
    ) -> nm_status,

    // Appended to version 1 (forced charges); present when `struct_size` covers them.
    pub reservation_force_grow: unsafe extern "C" fn(
        r: nm_reservation,
        bytes: u64,
        overcommitted: *mut u64,
        err: Err,
    ) -> nm_status,
    pub reservation_force_shrink: unsafe extern "C" fn(
        r: nm_reservation,
        bytes: u64,
        released: *mut u64,
        err: Err,
    ) -> nm_status,

    // Appended: creation with options.
    pub manager_create_with: unsafe extern "C" fn(
        name: *const c_char,
        options: *const NmManagerOptions,
        listener: *const NmListener,
        out: *mut nm_manager,
        err: Err,
    ) -> nm_status,

    // Appended: the container governor's allocator trim hooks.
    pub trim_hook_register: unsafe extern "C" fn(
        trim: Option<unsafe extern "C" fn(ctx: *mut c_void) -> u64>,
        ctx: *mut c_void,
        drop: Option<unsafe extern "C" fn(ctx: *mut c_void)>,
        out_id: *mut u64,
        err: Err,
    ) -> nm_status,
    pub trim_hook_unregister: unsafe extern "C" fn(id: u64, err: Err) -> nm_status,

    // Appended: per-consumer peaks.
    pub reservation_peak:
        unsafe extern "C" fn(r: nm_reservation, out: *mut u64, err: Err) -> nm_status,

    // Appended: what spills wrote.
    pub pool_spill_written: unsafe extern "C" fn(pool: nm_pool, bytes: u64, err: Err) -> nm_status,

    // Appended: over-commit reserved at once.
    pub manager_cover_overcommit:
        unsafe extern "C" fn(lease: nm_lease, granted: *mut u64, err: Err) -> nm_status,
}

/// `NM_API_V1_SIZE`: the size of version 1's first table, before the forced charges were
/// appended (`reservation_force_grow` starts there).
pub const NM_API_V1_SIZE: u32 = core::mem::offset_of!(NmApi, reservation_force_grow) as u32;

impl NmApi {
    /// What `nm_api_check` of the header does: true if a table with this header can be used by a
    /// caller compiled against this crate.
    pub fn check(abi_version: u32, struct_size: u32) -> bool {
        abi_version >= NM_ABI_VERSION && struct_size as usize >= core::mem::size_of::<NmApi>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    /// The layout C compilers give the header's structs on the 64-bit targets the jar ships
    /// (x86_64, aarch64): pinned so a reordering here cannot go unnoticed. The C test engine
    /// (tests/c) checks the same numbers from the C side.
    #[test]
    fn layout_matches_the_header() {
        assert_eq!(size_of::<NmSpillerVtable>(), 40);
        assert_eq!(offset_of!(NmSpillerVtable, ctx), 8);
        assert_eq!(offset_of!(NmSpillerVtable, drop), 32);
        assert_eq!(size_of::<NmListener>(), 40);
        assert_eq!(size_of::<NmManagerStats>(), 40);
        assert_eq!(size_of::<NmPoolStats>(), 24);
        assert_eq!(offset_of!(NmApi, free_message), 8);
        assert_eq!(offset_of!(NmApi, acquire), 16);
        assert_eq!(offset_of!(NmApi, manager_close), 8 + 8 * 22);
        assert_eq!(offset_of!(NmApi, manager_reclaim), 8 + 8 * 24);
        assert_eq!(
            offset_of!(NmApi, reservation_force_grow),
            NM_API_V1_SIZE as usize
        );
        assert_eq!(NM_API_V1_SIZE, 208);
        assert_eq!(offset_of!(NmApi, reservation_force_shrink), 8 + 8 * 26);
        assert_eq!(offset_of!(NmApi, manager_create_with), 8 + 8 * 27);
        assert_eq!(offset_of!(NmApi, trim_hook_register), 232);
        assert_eq!(offset_of!(NmApi, trim_hook_unregister), 240);
        assert_eq!(offset_of!(NmApi, reservation_peak), 248);
        assert_eq!(offset_of!(NmApi, pool_spill_written), 256);
        assert_eq!(offset_of!(NmApi, manager_cover_overcommit), 264);
        assert_eq!(size_of::<NmApi>(), 272);
        assert_eq!(size_of::<NmManagerOptions>(), 40);
        assert_eq!(offset_of!(NmManagerOptions, reservation_block), 8);
        assert_eq!(offset_of!(NmManagerOptions, task_limit), 16);
        assert_eq!(offset_of!(NmManagerOptions, reservation_quantum), 24);
        assert_eq!(offset_of!(NmManagerOptions, close_timeout_millis), 32);
        // The header's NM_DEFAULT_RESERVATION_QUANTUM (tests/c/header_check.c pins the same).
        assert_eq!(NM_DEFAULT_RESERVATION_QUANTUM, 1 << 20);
        assert_eq!(
            NmManagerOptions::default().reservation_quantum,
            NM_DEFAULT_RESERVATION_QUANTUM
        );
    }
}
