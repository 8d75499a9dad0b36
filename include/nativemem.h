/*
 * nativemem.h: the engine ABI of nativemem, for native engines in their own shared library.
 *
 * A Spark task's memory manager lives in libnativemem_jni.so (the table below is filled by
 * native/provider, linked into that library). Java creates it
 * (org.nativemem.NativeMemoryManager) and passes two plain integers to the engine:
 *
 *     long api    = NativeMemoryManager.nativeApi();  // address of the nm_api table below
 *     long handle = manager.handle();                 // the task's manager, an nm_manager
 *
 * The engine reaches the manager only through the functions of the table (never by linking a
 * second copy of nativemem: a second copy has its own, empty handle table). A Rust engine uses the
 * nativemem-client crate, which wraps this same table.
 *
 *     const nm_api *api = (const nm_api *)(uintptr_t)api_address;
 *     if (nm_api_check(api) != NM_OK) { ... }            // version and size checks, see below
 *     nm_lease lease;  char *err = NULL;
 *     if (api->acquire(handle, &lease, &err) != NM_OK) { report(err); api->free_message(err); }
 *     nm_pool pool;    api->pool_open(lease, "engine/hash", -1, &pool, &err);
 *     nm_reservation r; api->reservation_new(pool, "HashBuild[3]", &r, &err);
 *     api->reservation_try_grow(r, 64 << 20, &err);     // NM_ERR_OUT_OF_MEMORY: spill or fail
 *     ...
 *     api->reservation_close(r, NULL);  api->pool_close(pool, NULL);  api->release(lease, NULL);
 *
 * ## Versions
 * The table starts with abi_version and struct_size and only grows at its end. An engine built
 * against NM_ABI_VERSION N works with any library whose table has abi_version >= N and
 * struct_size >= sizeof(the nm_api it was compiled with); check both once (nm_api_check does).
 * Fields are never removed or reordered; a change that cannot be additive gets a new table.
 * Version 1's first table ended at NM_API_V1_SIZE; the forced charges, manager_create_with,
 * the trim hooks, reservation_peak, pool_spill_written and manager_cover_overcommit were
 * appended to it (additions keep the version: NM_ABI_VERSION changes only with a new table).
 * An engine that must also run with an older library tests the newer functions one by one with NM_API_HAS(api, field) instead of calling
 * nm_api_check. Structs the engine passes in (nm_spiller_vtable, nm_listener, nm_manager_options)
 * carry their own struct_size, so an engine built against an older header keeps working.
 *
 * ## Handles
 * Every object is named by a 64-bit handle (slot index + generation + kind tag), never by a
 * pointer: a handle that was closed, belongs to another kind, or was made up is refused with
 * NM_ERR_STALE_HANDLE or NM_ERR_INVALID_HANDLE. Nothing behind a handle is ever freed while a
 * call on it runs. 0 is never a valid handle.
 *
 * ## Errors
 * Every function except free_message returns an nm_status (NM_OK = 0) and takes `char **err` last.
 * On failure, if err is not NULL, *err receives a NUL-terminated UTF-8 message (for
 * NM_ERR_OUT_OF_MEMORY: what was asked, which pool refused, then the task's usage report). The
 * caller owns it and frees it with api->free_message. If err is NULL no message is made. On
 * success *err is set to NULL. Decide on the code, never on the text. A function that fails
 * changes nothing and takes ownership of nothing: a callback or state passed to it (spiller
 * vtable, listener, attached state) stays the caller's, and its drop callback is not called.
 *
 * ## Threads and locks
 * Every function may be called from any thread, concurrently, including threads the JVM never
 * saw (nativemem attaches them itself when it must call Java). No nativemem lock is held while a
 * callback of yours runs (spill, spillable_bytes, drop, listener), so callbacks may call back into
 * this table; a spill callback must not wait for another thread that may itself be waiting for
 * memory.
 *
 * ## Lifetime and close
 * A task's manager is closed by its owner (the Spark task-completion listener). Close:
 *   1. refuses new calls and new leases (NM_ERR_CLOSED / NM_ERR_STALE_HANDLE), on every handle
 *      of the manager, a lease held elsewhere included; calls that only give back stay allowed
 *      (the table next to manager_close says which);
 *   2. waits, up to its close timeout (10 s by default), for calls in flight and for held leases
 *      to be released. If the time runs out, close reports it and returns, and the manager's
 *      memory is freed when the last call returns or the last lease is released: never under
 *      a holder. Hold a lease for the span of work, not for the life of an object;
 *   3. unregisters your spillers (their drop callbacks run), then runs the drop callbacks of the
 *      state you attached (these may still close reservations and free allocations of this
 *      manager: that is not a leak), then frees every allocation still live, releases every
 *      reservation still open (both reported as leaks), closes every pool handle, and gives all
 *      reserved memory back to Spark.
 * After close every handle of the manager's objects is stale; calls on them fail, never crash.
 */
#ifndef NATIVEMEM_H
#define NATIVEMEM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** The ABI version this header describes (1; functions appended to its table keep it). */
#define NM_ABI_VERSION 1u

/** Status codes. New codes may be added; treat an unknown non-zero code as an error. */
typedef int32_t nm_status;
#define NM_OK 0
/** A size, name, path, alignment or struct_size the ABI does not accept. Nothing changed. */
#define NM_ERR_INVALID_ARGUMENT 1
/** The handle named an object that was closed since (also: a manager closed by its owner). */
#define NM_ERR_STALE_HANDLE 2
/** The handle is 0, of another kind, or was never issued. */
#define NM_ERR_INVALID_HANDLE 3
/** The manager is closing or closed: no new work is accepted. */
#define NM_ERR_CLOSED 4
/** Limits, Spark and spilling together could not provide the bytes. Nothing changed. */
#define NM_ERR_OUT_OF_MEMORY 5
/** free() of a pointer this manager did not allocate, or freed already. Nothing changed. */
#define NM_ERR_UNKNOWN_POINTER 6
/** The reservation listener (Spark) failed; the message carries its error. */
#define NM_ERR_LISTENER 7
/** A spiller callback failed while freeing memory for this request. */
#define NM_ERR_SPILL 8
/** The library does not support what was asked (e.g. a newer ABI version). */
#define NM_ERR_UNSUPPORTED 9
/** close: calls or leases still held at the time limit; memory is freed when they end. */
#define NM_ERR_TIMEOUT 10
/** A bug inside nativemem was caught at the boundary (a Rust panic); nothing crossed it. */
#define NM_ERR_INTERNAL 11

/** Handles (see "Handles" above). */
typedef uint64_t nm_manager;     /* from Java: NativeMemoryManager.handle() */
typedef uint64_t nm_lease;       /* a manager pinned open: acquire .. release */
typedef uint64_t nm_pool;        /* a handle on one pool of the manager's tree */
typedef uint64_t nm_reservation; /* an accounting-only claim on a pool (RAII in Rust) */
typedef uint64_t nm_spiller;     /* a registered spiller */
typedef uint64_t nm_state;       /* engine state attached to the manager */

/**
 * A native consumer that can give memory back when asked (by a grow of the same task, or by
 * Spark through the task's MemoryConsumer). nativemem copies the struct at registration.
 */
typedef struct nm_spiller_vtable {
    /** sizeof(nm_spiller_vtable) as compiled by the caller; smaller than version 1's is refused. */
    uint32_t struct_size;
    uint32_t reserved0; /* 0 */
    /** Passed to every callback. Owned by the caller until drop(ctx) runs. */
    void *ctx;
    /** Bytes a spill could free now (0: do not ask). Must not fail; may be called often. */
    uint64_t (*spillable_bytes)(void *ctx);
    /**
     * Frees at least `target` bytes if it can (by shrinking or closing its reservations, freeing
     * its allocations) and stores the bytes freed in *freed. A non-zero return fails the request
     * that caused the spill (nativemem reports NM_ERR_SPILL); *freed is then ignored. It is never
     * called twice at once for the same spiller. Returning more than it held does not corrupt the
     * accounting (used and reserved follow what was actually released, and what Spark gets back
     * is measured, not taken from *freed); the spill statistics count *freed capped at the
     * spillable_bytes it reported.
     */
    nm_status (*spill)(void *ctx, uint64_t target, uint64_t *freed);
    /** May be NULL. Called exactly once, after the last spill call returned, when the spiller is
     *  unregistered (spiller_unregister or the manager's close). */
    void (*drop)(void *ctx);
} nm_spiller_vtable;

/**
 * Where a manager created with manager_create(_with) gets its memory (what Spark's MemoryConsumer
 * is for a manager created from Java). Calls come in whole blocks; no nativemem lock is held.
 */
typedef struct nm_listener {
    /** sizeof(nm_listener) as compiled by the caller. */
    uint32_t struct_size;
    uint32_t reserved0; /* 0 */
    void *ctx;
    /** Grants up to `bytes`: stores what it grants (<= bytes) in *granted. Non-zero = failure. */
    nm_status (*reserve)(void *ctx, uint64_t bytes, uint64_t *granted);
    /** Takes `bytes` back. Non-zero = failure (reported; the bytes stay counted as reserved). */
    nm_status (*unreserve)(void *ctx, uint64_t bytes);
    /** May be NULL. Called once when the manager is gone. */
    void (*drop)(void *ctx);
} nm_listener;

/**
 * The settings of a manager made with manager_create_with (what Java's NativeMemoryManager
 * builder sets). Start from nm_manager_options_default() and change what you need: every field's
 * default there is "the library's default". Fields are only ever appended; a struct_size smaller
 * than this version's struct is refused (NM_ERR_INVALID_ARGUMENT), a larger one (a newer header's)
 * is read up to this version's fields.
 */
typedef struct nm_manager_options {
    /** sizeof(nm_manager_options) as compiled by the caller. */
    uint32_t struct_size;
    uint32_t reserved0; /* 0 */
    /** Bytes asked of the listener at a time (what it reserves is a multiple); 0: 8 MiB. */
    uint64_t reservation_block;
    /** Limit of the whole task in bytes (a grow past it is NM_ERR_OUT_OF_MEMORY); -1: none. */
    int64_t task_limit;
    /**
     * Per-reservation slack in bytes, at most 2^40: a reservation charges its pools in multiples
     * of its quantum and serves small grows and shrinks from what it charged, so pools' used and
     * peak may run ahead of what the consumers hold (reservations' sizes, reports and limits stay
     * exact). Default NM_DEFAULT_RESERVATION_QUANTUM (1 MiB, the fast path); 0 (opt-in): exact
     * accounting, pools' used and peak equal what consumers hold byte for byte.
     */
    uint64_t reservation_quantum;
    /** How long manager_close waits for calls in flight and leases, in ms; -1: 10 s. */
    int64_t close_timeout_millis;
} nm_manager_options;

/**
 * The reservation quantum a manager gets when its creator does not choose one (1 MiB):
 * nm_manager_options_default(), manager_create, and manager_create_with with NULL options.
 */
#define NM_DEFAULT_RESERVATION_QUANTUM ((uint64_t)1 << 20)

/** The defaults of every setting, with struct_size filled in. */
static inline nm_manager_options nm_manager_options_default(void) {
    nm_manager_options o;
    o.struct_size = (uint32_t)sizeof(nm_manager_options);
    o.reserved0 = 0;
    o.reservation_block = 0;
    o.task_limit = -1;
    o.reservation_quantum = NM_DEFAULT_RESERVATION_QUANTUM;
    o.close_timeout_millis = -1;
    return o;
}

/** Read-outs of a manager (bytes). */
typedef struct nm_manager_stats {
    uint64_t used;     /* bytes charged to the task now */
    uint64_t peak;     /* highest `used` so far */
    uint64_t reserved; /* bytes reserved from the listener (Spark): used + cushion */
    uint64_t spill_count;
    uint64_t spilled_bytes;
} nm_manager_stats;

/** Read-outs of a pool (bytes). limit is -1 when the pool has none. */
typedef struct nm_pool_stats {
    uint64_t used;
    uint64_t peak;
    int64_t limit;
} nm_pool_stats;

/** The function table. Obtain it once per process; it is immutable and lives as long as the
 *  library (the JVM never unloads it). */
typedef struct nm_api {
    /** NM_ABI_VERSION of the library (>= the version the caller was compiled with). */
    uint32_t abi_version;
    /** sizeof(nm_api) of the library; fields past the caller's own struct are newer. */
    uint32_t struct_size;

    /** Frees a message returned through `err` (or a report). NULL is ignored. */
    void (*free_message)(char *message);

    /* ---- managers ------------------------------------------------------------------------- */

    /**
     * Pins the manager `manager` (the Java handle) open and returns a lease. While any lease is
     * held, the manager's close waits for it (time-bounded, see "Lifetime and close").
     * Fails: NM_ERR_STALE_HANDLE (the manager is closed or closing: close removes its handle
     * first), NM_ERR_INVALID_HANDLE (0, another kind, never issued).
     */
    nm_status (*acquire)(nm_manager manager, nm_lease *out, char **err);
    /** Ends a lease (from any thread). A second release of the same lease: NM_ERR_STALE_HANDLE. */
    nm_status (*release)(nm_lease lease, char **err);
    /** Read-outs of the leased manager. */
    nm_status (*manager_stats)(nm_lease lease, nm_manager_stats *out, char **err);
    /** The usage report (pool tree, used / peak / limit, consumers) as text; free it with
     *  free_message. */
    nm_status (*usage_report)(nm_lease lease, char **report, char **err);

    /* ---- pools ---------------------------------------------------------------------------- */

    /**
     * Opens the pool at `path` below the task's root ("engine/hash"; "" is the root), creating
     * missing pools. `limit` >= 0 sets the limit of the last element when it is created (asking
     * for a different limit of an existing pool is NM_ERR_INVALID_ARGUMENT); -1: no limit. The
     * returned handle is yours: close it with pool_close (the pool itself stays in the tree until
     * the manager closes; the manager's close also closes the handle).
     */
    nm_status (*pool_open)(nm_lease lease, const char *path, int64_t limit, nm_pool *out,
                           char **err);
    /** Closes a pool handle (not the pool). Reservations and allocations made through it stay. */
    nm_status (*pool_close)(nm_pool pool, char **err);
    /** used / peak / limit of the pool. */
    nm_status (*pool_stats)(nm_pool pool, nm_pool_stats *out, char **err);

    /* ---- reservations (accounting only: what an operator holds, DataFusion style) ---------- */

    /** A new, empty reservation of `pool` for `consumer` (a name for reports and errors). */
    nm_status (*reservation_new)(nm_pool pool, const char *consumer, nm_reservation *out,
                                 char **err);
    /**
     * Grows by `bytes`; may reserve from Spark and spill. On NM_ERR_OUT_OF_MEMORY the reservation
     * and every pool are as they were, but what Spark granted towards the grow (less than asked)
     * stays reserved as cushion: manager_stats' `reserved` rises by up to that grant, and the
     * next grow of the task uses it without asking Spark again. It goes back to Spark when Spark
     * asks (its spill request, manager_reclaim), when a release leaves more than two blocks
     * unused, or at close. (Handing it back at once would make every retry after a spill ask
     * Spark again for the bytes it just returned.)
     */
    nm_status (*reservation_try_grow)(nm_reservation r, uint64_t bytes, char **err);
    /** Shrinks by `bytes`; more than the size is NM_ERR_INVALID_ARGUMENT (nothing changes). */
    nm_status (*reservation_shrink)(nm_reservation r, uint64_t bytes, char **err);
    /** Sets the size to `new_size` (grows like try_grow, shrinks like shrink). */
    nm_status (*reservation_try_resize)(nm_reservation r, uint64_t new_size, char **err);
    /** Current size in bytes. */
    nm_status (*reservation_size)(nm_reservation r, uint64_t *out, char **err);
    /** Releases every byte; the reservation stays usable. *freed (may be NULL) gets the bytes. */
    nm_status (*reservation_free)(nm_reservation r, uint64_t *freed, char **err);
    /** Releases every byte and ends the handle. If the manager is closing, its close does it. */
    nm_status (*reservation_close)(nm_reservation r, char **err);

    /* ---- allocations (memory, charged to a pool, freed by close if leaked) ----------------- */

    /**
     * Allocates `size` bytes (> 0) aligned to `align` (a power of two; 0 means 16), uninitialized,
     * charged to `pool`; may reserve from Spark and spill. On failure *out is NULL.
     * Free it with free(); what is live when the manager closes is freed then and reported.
     */
    nm_status (*allocate)(nm_pool pool, uint64_t size, uint64_t align, void **out, char **err);
    /** Frees an allocation of this pool's manager; *size (may be NULL) gets its size. A pointer
     *  the manager does not know (foreign, freed already): NM_ERR_UNKNOWN_POINTER. */
    nm_status (*free)(nm_pool pool, void *ptr, uint64_t *size, char **err);

    /* ---- spill ----------------------------------------------------------------------------- */

    /**
     * Registers a spiller for the memory of `pool` (nativemem copies *vtable). Spark asking the
     * task for memory and grows of the same task that find no room may call it, on any thread.
     * If registration fails, drop(ctx) is NOT called: ctx stays the caller's.
     */
    nm_status (*spiller_register)(nm_pool pool, const char *name, const nm_spiller_vtable *vtable,
                                  nm_spiller *out, char **err);
    /** Unregisters: waits for nothing; a spill running now finishes, then drop(ctx) runs once. */
    nm_status (*spiller_unregister)(nm_spiller spiller, char **err);

    /* ---- engine state ------------------------------------------------------------------- */

    /**
     * Ties `state` to the manager's life: when the manager closes, drop(state) runs (before the
     * leak check, so reservations and allocations it releases are not leaks). drop may be NULL.
     */
    nm_status (*attach)(nm_lease lease, void *state, void (*drop)(void *state), nm_state *out,
                        char **err);
    /** Unties it. run_drop != 0 runs drop(state) now; 0 gives ownership back to the caller. */
    nm_status (*detach)(nm_state handle, int32_t run_drop, char **err);

    /* ---- managers without a JVM (an engine's own tests, embedding) --------------------- */

    /**
     * Creates a manager whose memory comes from `listener` (NULL: unlimited). reservation_block:
     * 0 for the default (8 MiB); task_limit: -1 for none; the other settings are the defaults of
     * nm_manager_options (manager_create_with takes them all). The caller owns it: close it with
     * manager_close. A manager created from Java is closed by Java, never through this table
     * (manager_close refuses it with NM_ERR_INVALID_ARGUMENT).
     */
    nm_status (*manager_create)(const char *name, uint64_t reservation_block, int64_t task_limit,
                                const nm_listener *listener, nm_manager *out, char **err);
    /**
     * Closes a manager made by manager_create(_with) (see "Lifetime and close"). *leak_report (may be
     * NULL) gets the leak report text (free it with free_message); *leaked_bytes (may be NULL)
     * the bytes that were still held.
     *
     * Every function during and after a close (the same for a manager Java closes). "During":
     * close has started and waits for a lease or a call on another thread; "after": it returned.
     *
     *   function                     during close              after close
     *   ---------------------------  ------------------------  -------------------
     *   free_message                 allowed                   allowed
     *   acquire                      NM_ERR_STALE_HANDLE       NM_ERR_STALE_HANDLE
     *   release                      allowed (close waits      NM_ERR_STALE_HANDLE
     *                                for it)                   (it was released)
     *   manager_stats, usage_report  NM_ERR_CLOSED             NM_ERR_STALE_HANDLE
     *   pool_open, attach            NM_ERR_CLOSED             NM_ERR_STALE_HANDLE
     *   manager_spill,
     *   manager_reclaim,
     *   manager_cover_overcommit     NM_ERR_CLOSED             NM_ERR_STALE_HANDLE
     *   pool_stats, reservation_new,
     *   allocate, spiller_register   NM_ERR_CLOSED             NM_ERR_STALE_HANDLE
     *   reservation_try_grow,
     *   _try_resize, _size,
     *   _force_grow                  NM_ERR_CLOSED             NM_ERR_STALE_HANDLE
     *   reservation_shrink, _free,
     *   _force_shrink, _close, free  allowed (gives back)      NM_ERR_STALE_HANDLE
     *   pool_close,
     *   spiller_unregister, detach   allowed                   NM_ERR_STALE_HANDLE
     *   manager_create,
     *   manager_create_with          allowed (another manager) allowed
     *   trim_hook_register,
     *   _unregister                  allowed (process-wide)    allowed
     *   manager_close                NM_ERR_STALE_HANDLE       NM_ERR_STALE_HANDLE
     *
     * "Allowed" calls that give back release their bytes at once, so an engine can clean up on
     * one thread while close waits for another (what they release is no leak). A give-back that
     * races the end of the wait may instead get NM_ERR_CLOSED (reservation_close: NM_OK), the
     * close having released the object itself. A failed attach or spiller_register leaves its
     * state or ctx the caller's, as always. (Checked function by function by
     * native/provider/tests/close_contract.rs.)
     */
    nm_status (*manager_close)(nm_manager manager, char **leak_report, uint64_t *leaked_bytes,
                               char **err);

    /* ---- taking memory back (what Spark does through the task's MemoryConsumer) ------------ */

    /**
     * Asks the manager's spillers to free `target` bytes: first the one whose spillable size is
     * the smallest that covers it, else the largest, until covered or none is left. The freed
     * memory stays reserved (cushion for the next grows). *freed (may be NULL) gets the bytes the
     * spillers freed. Runs spill callbacks on this thread; never call it from inside one.
     */
    nm_status (*manager_spill)(nm_lease lease, uint64_t target, uint64_t *freed, char **err);
    /**
     * Gives memory back to the listener: first unused cushion, then spills for the rest and gives
     * that back too. *returned (may be NULL) gets the bytes handed to the listener (what Spark's
     * spill request returns). For embedders that play Spark's role for a manager of their own.
     */
    nm_status (*manager_reclaim)(nm_lease lease, uint64_t target, uint64_t *returned, char **err);

    /* ---- forced charges: memory the engine allocated without asking (appended to version 1) -- */
    /*
     * For code that can neither fail nor call Spark: a malloc hook or a global allocator that
     * charges what a task's threads allocate (see "Untracked native memory" in the README, and
     * nativemem-track for Rust engines). Present when the table's struct_size covers them: test
     * with NM_API_HAS(api, reservation_force_grow) before use if the engine may run with an older
     * library (nm_api_check already guarantees it for a library at least as new as this header).
     *
     * Both are safe to call from inside a malloc hook *if* the hook has a thread-local guard
     * against re-entry: this library allocates (with its own malloc) during the call, so a hook
     * that replaces the process's malloc sees those calls; with err == NULL no message is made.
     */

    /**
     * Grows `r` by `bytes` at once, whatever the pool limits and the memory reserved from Spark:
     * never calls the JVM or a spill callback, never waits for another call. The part not covered
     * by the bytes already reserved from Spark is over-commit: *overcommitted (may be NULL) gets
     * it; it shows in the usage report ("Over-committed: ...") and the next reservation_try_grow
     * or allocate of the task that needs Spark reserves it with its own bytes (or spills, or
     * fails with NM_ERR_OUT_OF_MEMORY). A pool pushed over its limit refuses grows until enough is
     * released. Fails (nothing changes): handles, NM_ERR_CLOSED, NM_ERR_INVALID_ARGUMENT (bytes >
     * 2^62). Batch: call it per megabyte of change, not per malloc.
     */
    nm_status (*reservation_force_grow)(nm_reservation r, uint64_t bytes, uint64_t *overcommitted,
                                        char **err);
    /**
     * Shrinks `r` by up to `bytes` (what it holds, if less) without calling the JVM: the bytes
     * stay reserved from Spark as cushion until a later release, Spark's spill request or the
     * manager's close gives them back. *released (may be NULL) gets the bytes released (0 once
     * the manager's close emptied the reservation). Fails only on handles and NM_ERR_CLOSED.
     */
    nm_status (*reservation_force_shrink)(nm_reservation r, uint64_t bytes, uint64_t *released,
                                          char **err);

    /* ---- appended: creation with options ----------------------------------------------------- */

    /**
     * manager_create with every setting (see nm_manager_options); options NULL: the defaults.
     * The manager is the caller's, closed with manager_close, exactly as one of manager_create
     * (which keeps working, with the defaults for what it does not take). Fails with
     * NM_ERR_INVALID_ARGUMENT (nothing made, the listener stays the caller's) on a struct_size
     * below this version's, a non-zero reserved0, or a value out of range.
     */
    nm_status (*manager_create_with)(const char *name, const nm_manager_options *options,
                                     const nm_listener *listener, nm_manager *out, char **err);

    /* ---- appended: the container governor's allocator trim hooks ------------------------------ */

    /**
     * Registers `trim`, which the executor's container governor calls under container memory
     * pressure, after this library's own malloc_trim and again after native spills freed memory:
     * it makes the engine's own allocator return free pages to the kernel (mimalloc:
     * mi_collect(true); jemalloc: mallctl("arena.<MALLCTL_ARENAS_ALL>.purge")) and returns the
     * bytes it released if it knows them, else 0. Called on the governor's thread, with no lock of
     * this library held; it must not call back into this table. Process-wide, not per manager:
     * register once per engine library. *out_id gets the id for trim_hook_unregister. `drop` (may
     * be NULL) runs with `ctx` once the hook is unregistered and no call of it runs (possibly on
     * the governor's thread, after trim_hook_unregister returned): unload the engine's library
     * only after it ran. Fails with NM_ERR_INVALID_ARGUMENT (trim or out_id NULL; nothing kept).
     */
    nm_status (*trim_hook_register)(uint64_t (*trim)(void *ctx), void *ctx, void (*drop)(void *ctx),
                                    uint64_t *out_id, char **err);
    /** Unregisters a trim hook (see trim_hook_register for when its drop runs). Fails with
     *  NM_ERR_INVALID_HANDLE for an id that is not registered. */
    nm_status (*trim_hook_unregister)(uint64_t id, char **err);

    /* ---- appended: per-consumer peaks ------------------------------------------------------- */

    /**
     * The most bytes the reservation has held (its consumer's peak: what an engine shows as an
     * operator's "peak memory"; the pool's is nm_pool_stats.peak). Fails like reservation_size.
     */
    nm_status (*reservation_peak)(nm_reservation r, uint64_t *out, char **err);

    /* ---- appended: what spills wrote ------------------------------------------------------------ */

    /**
     * Counts `bytes` the task's spills wrote (spill files) for the pool's manager, which Spark
     * shows as the task's Spill (Disk); what spillers *freed* the manager counts itself (Spill
     * (Memory)). Call it from a spill callback (with the pool the spiller was registered on) or
     * once per spill file, on any thread; it never blocks. Fails like pool_stats.
     */
    nm_status (*pool_spill_written)(nm_pool pool, uint64_t bytes, char **err);

    /* ---- appended: over-commit reserved at once --------------------------------------------- */

    /**
     * Reserves from the listener (Spark), now, the task's over-commit (what reservation_force_grow
     * charged beyond the bytes reserved) that its reserve does not cover, whatever the task limit
     * (the bytes are in use already): Spark's reservation then shows them at once, not only at the
     * task's next grow that reaches Spark. For an engine that forced a grow but may call out
     * right after (not from a malloc hook: this may call the JVM; it never calls a spill
     * callback). *granted (may be NULL) gets the bytes the listener granted (0 when nothing is
     * over-committed); what it does not grant stays over-commit, paid as before. Fails (nothing
     * changes) like manager_spill: handles (NM_ERR_STALE_HANDLE, NM_ERR_INVALID_HANDLE),
     * NM_ERR_CLOSED, or the listener's failure. Present when NM_API_HAS(api,
     * manager_cover_overcommit); with an older library, skip it (the over-commit is then reserved
     * by the next grow that reaches Spark).
     */
    nm_status (*manager_cover_overcommit)(nm_lease lease, uint64_t *granted, char **err);
} nm_api;

/** Size of version 1's first table (before the forced charges were appended). */
#define NM_API_V1_SIZE ((uint32_t)offsetof(nm_api, reservation_force_grow))

/** True if the table `api` has the field `member` (an older library's table may end before). */
#define NM_API_HAS(api, member)                                                                   \
    ((api)->struct_size >= offsetof(nm_api, member) + sizeof(((nm_api *)0)->member))

/**
 * The table of the library, if it supports `min_version`; NULL otherwise. Exported by
 * libnativemem_jni.so; reachable with dlsym only if the library was loaded RTLD_GLOBAL (the JVM
 * loads it RTLD_LOCAL: take the address from NativeMemoryManager.nativeApi() instead).
 */
const nm_api *nativemem_api(uint32_t min_version);

/** Checks a table obtained from Java before use: NM_OK, or NM_ERR_UNSUPPORTED if it is NULL, older
 *  than this header, or smaller than this header's nm_api. */
static inline nm_status nm_api_check(const nm_api *api) {
    if (api == NULL || api->abi_version < NM_ABI_VERSION || api->struct_size < sizeof(nm_api)) {
        return NM_ERR_UNSUPPORTED;
    }
    return NM_OK;
}

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* NATIVEMEM_H */
