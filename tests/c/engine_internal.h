/*
 * What the C test engine's files share (engine.c: the engine; probes.c: misuse probes): the
 * engine struct and the JNI helpers. Private to libnm_test_engine.so: every function declared
 * here has hidden visibility, so the library exports only its JNI entry points.
 * A .c file defines _POSIX_C_SOURCE before including this header.
 */
#ifndef NM_TEST_ENGINE_INTERNAL_H
#define NM_TEST_ENGINE_INTERNAL_H

#include <jni.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "nativemem.h"

#define UNUSED(x) ((void)(x))
#define ALIGN 64u
#define EXCEPTION_CLASS "org/nativemem/engine/CEngineException"
#define INTERNAL __attribute__((visibility("hidden")))

/* ---- the engine (see engine.c for its locking and lifetime) ----------------------------------- */

typedef struct buffer {
    void *ptr;
    uint64_t size;
} buffer;

typedef struct engine {
    const nm_api *api;
    nm_manager manager;
    nm_pool pool;
    nm_spiller spiller;
    nm_state state;
    atomic_int refs;

    pthread_mutex_t mu; /* never held across a call into the table */
    nm_reservation index;   /* 0 once the drop closed it */
    buffer *bufs;
    size_t nbufs, cap;
    uint64_t buf_bytes;     /* bytes in bufs */
    uint64_t index_bytes;   /* recorded size of `index` (<= its real size) */
    uint64_t spill_calls, spills, spilled_bytes, spill_errors;
    uint64_t over_report;   /* misuse: the spill callback claims this much more than it freed */
    nm_status spill_status; /* misuse: non-zero makes the spill callback fail */
    uint64_t spiller_dropped, state_dropped;
    uint64_t drop_freed_bytes, drop_freed_buffers, drop_errors;
    pthread_t drop_thread;
    uint64_t leaked_alloc_bytes, leaked_reservation_bytes;
    void *leak_ptr;
    nm_reservation leak_res;
    nm_lease last_lease;    /* the last lease a call released (for the stale-lease probe) */
    int shut_down;
} engine;

/* ---- helpers (engine.c) ------------------------------------------------------------------------ */

/* Throws CEngineException(status, "<what>: <message> (<NAME>)") and frees `err` (may be NULL). */
INTERNAL void throw_status(JNIEnv *env, const nm_api *api, nm_status st, char *err, const char *what);
/* Throws IllegalStateException(what). */
INTERNAL void throw_state(JNIEnv *env, const char *what);
/* A new long[] holding `values` (NULL with an exception pending on failure). */
INTERNAL jlongArray long_array(JNIEnv *env, const int64_t *values, jsize n);
/* The engine behind CEngine's pointer; NULL with IllegalStateException if it is 0 (closed). */
INTERNAL engine *engine_of(JNIEnv *env, jlong ptr);
/* A lease on the engine's manager, for one JNI call. */
INTERNAL nm_status lease_acquire(engine *e, nm_lease *out, char **err);
/* Releases a lease of lease_acquire and records it as the engine's last lease. */
INTERNAL void lease_release(engine *e, nm_lease lease);

/* The nm_api table at the address Java passed (NativeMemoryManager.nativeApi()). */
static inline const nm_api *api_of(jlong address) {
    return (const nm_api *)(uintptr_t)address;
}

/* True if every 4096th byte of p[0..n) and its last byte are `v` (n > 0). */
static inline int check_pattern(const unsigned char *p, uint64_t n, unsigned char v) {
    for (uint64_t i = 0; i < n; i += 4096) {
        if (p[i] != v) {
            return 0;
        }
    }
    return p[n - 1] == v;
}

#endif
