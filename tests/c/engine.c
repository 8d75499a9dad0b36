/*
 * nm_test_engine: a small native engine written in C against include/nativemem.h only.
 *
 * It shows that an engine needs nothing but the ABI: a shared library of its own, built with the
 * system C compiler, that never links libnativemem_jni. Java hands it two integers, the
 * address of the nm_api table (NativeMemoryManager.nativeApi()) and a manager handle
 * (manager.handle()), and everything else goes through the table.
 *
 * JNI exports for org.nativemem.engine.CEngine (tests/support/java). Errors become
 * org.nativemem.engine.CEngineException(status, message); every message from the table is freed
 * with api->free_message.
 *
 * ## Files
 * engine.c (this file): what a real engine does: pools, reservations, allocations, a spiller,
 * attached state, threads the JVM never saw, a lease held across the close, a manager without a
 * JVM, a malloc hook over forced charges. probes.c: misuse checked at the C level (forged,
 * wrong-kind and stale handles, bad arguments and vtables, doctored tables). engine_internal.h:
 * what the two share (the engine struct, JNI helpers).
 *
 * ## The engine
 * One `engine` per CEngine.open: a pool handle, a spillable "index" reservation, spillable
 * buffers (api->allocate), a registered spiller and the engine itself attached as state, so the
 * manager's close drops it (frees its buffers through the table, closes its reservation).
 *
 * ## Leases: one per JNI call, never across calls
 * A lease pins the manager open, and the manager's close waits (up to its timeout, 10 s by
 * default) for every lease. A lease kept between JNI calls would therefore make every Spark task
 * end wait for the timeout and then defer the close to whenever the engine next runs. So each
 * JNI entry point acquires a lease, works, and releases it before returning; between calls the
 * engine holds only handles (pool, reservations, spiller, state), which pin nothing and simply
 * go stale when the manager closes. Within a call the lease guarantees that the close cannot run
 * between two steps of one operation. (The lease-held-at-close test holds one on purpose.)
 *
 * ## Locking
 * `engine.mu` guards the engine's own bookkeeping only and is NEVER held while calling into the
 * table: any allocate / try_grow may spill, and the spill callback (on this thread, re-entrantly,
 * or on any other thread, e.g. Spark's task thread inside its TaskMemoryManager) takes `mu`.
 * So a caller first calls the table, then records the result under `mu`; the spill callback
 * first claims what it will free under `mu` (removes the buffers from the list, lowers the
 * recorded index size), then frees outside it. The recorded index size is therefore never above
 * the reservation's real size, and a buffer is freed by exactly one of spill, drop or the caller.
 *
 * ## Lifetime of the struct
 * Three owners, counted in `refs`: Java (CEngine.close/dispose), the spiller (its drop callback)
 * and the attached state (its drop callback). The last one frees the struct, so Java can still
 * read the counters after the manager's close dropped the engine.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine_internal.h"

/* ---- process-wide counters (read by the Spark job after the tasks' managers closed) ---------- */

static atomic_ullong g_opened;         /* engines opened */
static atomic_ullong g_structs_freed;  /* engine structs freed (all three owners gone) */
static atomic_ullong g_state_drops;    /* attached-state drop callbacks run */
static atomic_ullong g_spiller_drops;  /* spiller drop callbacks run */
static atomic_ullong g_spills;         /* spill callbacks that freed something */
static atomic_ullong g_spilled_bytes;  /* bytes those freed (really released) */
static atomic_ullong g_drop_freed_bytes; /* bytes the state drops freed */
static atomic_ullong g_drop_errors;    /* failed api calls inside drops */

/* ---- errors ----------------------------------------------------------------------------------- */

static const char *status_name(nm_status st) {
    switch (st) {
    case NM_OK: return "NM_OK";
    case NM_ERR_INVALID_ARGUMENT: return "NM_ERR_INVALID_ARGUMENT";
    case NM_ERR_STALE_HANDLE: return "NM_ERR_STALE_HANDLE";
    case NM_ERR_INVALID_HANDLE: return "NM_ERR_INVALID_HANDLE";
    case NM_ERR_CLOSED: return "NM_ERR_CLOSED";
    case NM_ERR_OUT_OF_MEMORY: return "NM_ERR_OUT_OF_MEMORY";
    case NM_ERR_UNKNOWN_POINTER: return "NM_ERR_UNKNOWN_POINTER";
    case NM_ERR_LISTENER: return "NM_ERR_LISTENER";
    case NM_ERR_SPILL: return "NM_ERR_SPILL";
    case NM_ERR_UNSUPPORTED: return "NM_ERR_UNSUPPORTED";
    case NM_ERR_TIMEOUT: return "NM_ERR_TIMEOUT";
    case NM_ERR_INTERNAL: return "NM_ERR_INTERNAL";
    default: return "unknown status";
    }
}

/* Throws CEngineException(status, "<what>: <message> (<NAME>)") and frees `err` (may be NULL). */
void throw_status(JNIEnv *env, const nm_api *api, nm_status st, char *err, const char *what) {
    const char *text = err != NULL ? err : "(no message)";
    size_t len = strlen(what) + strlen(text) + 64;
    char *buf = malloc(len);
    if (buf != NULL) {
        snprintf(buf, len, "%s: %s (%s)", what, text, status_name(st));
    }
    if (api != NULL && err != NULL) {
        api->free_message(err);
    }
    if ((*env)->ExceptionCheck(env)) {
        free(buf);
        return;
    }
    jclass cls = (*env)->FindClass(env, EXCEPTION_CLASS);
    if (cls != NULL) {
        jmethodID ctor = (*env)->GetMethodID(env, cls, "<init>", "(ILjava/lang/String;)V");
        jstring msg = ctor != NULL ? (*env)->NewStringUTF(env, buf != NULL ? buf : what) : NULL;
        if (msg != NULL) {
            jobject ex = (*env)->NewObject(env, cls, ctor, (jint)st, msg);
            if (ex != NULL) {
                (*env)->Throw(env, (jthrowable)ex);
            }
        }
    }
    free(buf);
}

void throw_state(JNIEnv *env, const char *what) {
    jclass cls = (*env)->FindClass(env, "java/lang/IllegalStateException");
    if (cls != NULL) {
        (*env)->ThrowNew(env, cls, what);
    }
}

jlongArray long_array(JNIEnv *env, const int64_t *values, jsize n) {
    jlong tmp[64];
    if (n > 64) {
        return NULL;
    }
    jlongArray out = (*env)->NewLongArray(env, n);
    if (out == NULL) {
        return NULL;
    }
    for (jsize i = 0; i < n; i++) {
        tmp[i] = (jlong)values[i];
    }
    (*env)->SetLongArrayRegion(env, out, 0, n, tmp);
    return out;
}

/* ---- the engine ------------------------------------------------------------------------------- */

static void engine_unref(engine *e) {
    if (atomic_fetch_sub(&e->refs, 1) == 1) {
        pthread_mutex_destroy(&e->mu);
        free(e->bufs);
        free(e);
        atomic_fetch_add(&g_structs_freed, 1);
    }
}

nm_status lease_acquire(engine *e, nm_lease *out, char **err) {
    return e->api->acquire(e->manager, out, err);
}

void lease_release(engine *e, nm_lease lease) {
    nm_status st = e->api->release(lease, NULL);
    pthread_mutex_lock(&e->mu);
    e->last_lease = lease;
    if (st != NM_OK) {
        e->spill_errors++; /* cannot happen for a lease this engine acquired */
    }
    pthread_mutex_unlock(&e->mu);
}

/* Records a buffer as spillable. Returns 0, or -1 if the engine's state was dropped already (the
 * caller then frees the buffer itself). */
static int push_buffer(engine *e, void *p, uint64_t size) {
    int rc = 0;
    pthread_mutex_lock(&e->mu);
    if (e->state_dropped) {
        rc = -1;
    } else {
        if (e->nbufs == e->cap) {
            size_t cap = e->cap ? e->cap * 2 : 16;
            buffer *nb = realloc(e->bufs, cap * sizeof *nb);
            if (nb == NULL) {
                rc = -1;
            } else {
                e->bufs = nb;
                e->cap = cap;
            }
        }
        if (rc == 0) {
            e->bufs[e->nbufs].ptr = p;
            e->bufs[e->nbufs].size = size;
            e->nbufs++;
            e->buf_bytes += size;
        }
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

/* Takes up to `max_count` buffers (newest first) until `target` bytes are covered; the caller
 * owns the returned array (free()) and frees the buffers through the table. */
static buffer *take_buffers(engine *e, uint64_t target, size_t max_count, size_t *count,
                            uint64_t *bytes) {
    buffer *taken = NULL;
    size_t k = 0;
    uint64_t picked = 0;
    while (k < e->nbufs && k < max_count && picked < target) {
        picked += e->bufs[e->nbufs - 1 - k].size;
        k++;
    }
    if (k > 0) {
        taken = malloc(k * sizeof *taken);
        if (taken == NULL) {
            k = 0;
            picked = 0;
        } else {
            memcpy(taken, &e->bufs[e->nbufs - k], k * sizeof *taken);
            e->nbufs -= k;
            e->buf_bytes -= picked;
        }
    }
    *count = k;
    *bytes = picked;
    return taken;
}

/* ---- callbacks (run by nativemem on any thread, with no nativemem lock held) ------------------- */

static uint64_t cb_spillable_bytes(void *ctx) {
    engine *e = ctx;
    pthread_mutex_lock(&e->mu);
    uint64_t v = e->buf_bytes + e->index_bytes;
    pthread_mutex_unlock(&e->mu);
    return v;
}

/* Frees buffers (api->free) and shrinks the index reservation, re-entering the table from
 * inside the spill. Claims under `mu`, calls the table without it. */
static nm_status cb_spill(void *ctx, uint64_t target, uint64_t *freed) {
    engine *e = ctx;
    size_t count = 0;
    uint64_t picked = 0, index_take = 0;
    buffer *taken = NULL;

    pthread_mutex_lock(&e->mu);
    e->spill_calls++;
    nm_status fail = e->spill_status;
    uint64_t over = e->over_report;
    nm_reservation index = e->index;
    if (fail == NM_OK) {
        taken = take_buffers(e, target, SIZE_MAX, &count, &picked);
        if (picked < target && e->index_bytes > 0 && index != 0) {
            index_take = target - picked < e->index_bytes ? target - picked : e->index_bytes;
            e->index_bytes -= index_take;
        }
    }
    pthread_mutex_unlock(&e->mu);
    if (fail != NM_OK) {
        return fail;
    }

    uint64_t actual = 0, errors = 0;
    for (size_t i = 0; i < count; i++) {
        uint64_t size = 0;
        if (e->api->free(e->pool, taken[i].ptr, &size, NULL) == NM_OK) {
            actual += size;
        } else {
            errors++;
        }
    }
    free(taken);
    if (index_take > 0) {
        if (e->api->reservation_shrink(index, index_take, NULL) == NM_OK) {
            actual += index_take;
        } else {
            errors++;
        }
    }

    pthread_mutex_lock(&e->mu);
    if (actual > 0) {
        e->spills++;
    }
    e->spilled_bytes += actual;
    e->spill_errors += errors;
    pthread_mutex_unlock(&e->mu);
    if (actual > 0) {
        atomic_fetch_add(&g_spills, 1);
        atomic_fetch_add(&g_spilled_bytes, actual);
        /* As an engine that writes what it spills: what it wrote, for Spark's Spill (Disk). */
        if (NM_API_HAS(e->api, pool_spill_written)) {
            e->api->pool_spill_written(e->pool, actual, NULL);
        }
    }
    *freed = actual + over;
    return NM_OK;
}

static void cb_spiller_drop(void *ctx) {
    engine *e = ctx;
    pthread_mutex_lock(&e->mu);
    e->spiller_dropped++;
    pthread_mutex_unlock(&e->mu);
    atomic_fetch_add(&g_spiller_drops, 1);
    engine_unref(e);
}

/* The attached state's drop: runs in the manager's close (or detach). Frees every remaining
 * buffer and closes the index reservation through the table (close lets these calls in). */
static void cb_state_drop(void *ctx) {
    engine *e = ctx;
    pthread_mutex_lock(&e->mu);
    buffer *bufs = e->bufs;
    size_t n = e->nbufs;
    nm_reservation index = e->index;
    e->bufs = NULL;
    e->nbufs = 0;
    e->cap = 0;
    e->buf_bytes = 0;
    e->index = 0;
    e->index_bytes = 0;
    e->state_dropped++;
    e->drop_thread = pthread_self();
    pthread_mutex_unlock(&e->mu);

    uint64_t bytes = 0, buffers = 0, errors = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t size = 0;
        if (e->api->free(e->pool, bufs[i].ptr, &size, NULL) == NM_OK) {
            bytes += size;
            buffers++;
        } else {
            errors++;
        }
    }
    free(bufs);
    if (index != 0) {
        uint64_t index_freed = 0;
        if (e->api->reservation_free(index, &index_freed, NULL) == NM_OK) {
            bytes += index_freed;
        } else {
            errors++;
        }
        if (e->api->reservation_close(index, NULL) != NM_OK) {
            errors++;
        }
    }

    pthread_mutex_lock(&e->mu);
    e->drop_freed_bytes += bytes;
    e->drop_freed_buffers += buffers;
    e->drop_errors += errors;
    pthread_mutex_unlock(&e->mu);
    atomic_fetch_add(&g_state_drops, 1);
    atomic_fetch_add(&g_drop_freed_bytes, bytes);
    atomic_fetch_add(&g_drop_errors, errors);
    engine_unref(e);
}

/* ---- open --------------------------------------------------------------------------------------- */

/* Opens an engine on `manager`. On failure returns NULL with *st, *err (caller frees) and *what. */
static engine *engine_open(const nm_api *api, nm_manager manager, const char *path, int64_t limit,
                           nm_status *st, char **err, const char **what) {
    *err = NULL;
    *st = nm_api_check(api);
    if (*st != NM_OK) {
        *what = "nm_api_check: the table is older or smaller than nativemem.h";
        return NULL;
    }
    engine *e = calloc(1, sizeof *e);
    if (e == NULL) {
        *st = NM_ERR_OUT_OF_MEMORY;
        *what = "calloc(engine)";
        return NULL;
    }
    e->api = api;
    e->manager = manager;
    atomic_init(&e->refs, 1); /* Java's */
    pthread_mutex_init(&e->mu, NULL);

    nm_lease lease = 0;
    if ((*st = api->acquire(manager, &lease, err)) != NM_OK) {
        *what = "acquire";
        goto fail_struct;
    }
    if ((*st = api->pool_open(lease, path, limit, &e->pool, err)) != NM_OK) {
        *what = "pool_open";
        goto fail_lease;
    }
    if ((*st = api->reservation_new(e->pool, "CEngine.index", &e->index, err)) != NM_OK) {
        *what = "reservation_new(index)";
        goto fail_pool;
    }
    nm_spiller_vtable vt = {
        .struct_size = (uint32_t)sizeof(nm_spiller_vtable),
        .reserved0 = 0,
        .ctx = e,
        .spillable_bytes = cb_spillable_bytes,
        .spill = cb_spill,
        .drop = cb_spiller_drop,
    };
    atomic_fetch_add(&e->refs, 1); /* the spiller's */
    if ((*st = api->spiller_register(e->pool, "CEngine", &vt, &e->spiller, err)) != NM_OK) {
        atomic_fetch_sub(&e->refs, 1); /* not registered: drop will not run */
        *what = "spiller_register";
        goto fail_index;
    }
    atomic_fetch_add(&e->refs, 1); /* the attached state's */
    if ((*st = api->attach(lease, e, cb_state_drop, &e->state, err)) != NM_OK) {
        atomic_fetch_sub(&e->refs, 1);
        *what = "attach";
        api->spiller_unregister(e->spiller, NULL); /* its drop releases the spiller's ref */
        goto fail_index;
    }
    api->release(lease, NULL);
    atomic_fetch_add(&g_opened, 1);
    return e;

fail_index:
    api->reservation_close(e->index, NULL);
fail_pool:
    api->pool_close(e->pool, NULL);
fail_lease:
    api->release(lease, NULL);
fail_struct:
    atomic_fetch_add(&g_opened, 1); /* counted so that opened == freed holds */
    engine_unref(e);
    return NULL;
}

/* ---- JNI: the engine ------------------------------------------------------------------------------ */

engine *engine_of(JNIEnv *env, jlong ptr) {
    if (ptr == 0) {
        throw_state(env, "CEngine is closed");
        return NULL;
    }
    return (engine *)(uintptr_t)ptr;
}

JNIEXPORT jlong JNICALL Java_org_nativemem_engine_CEngine_nativeOpen(JNIEnv *env, jclass cls,
                                                                     jlong api_address,
                                                                     jlong manager, jstring path,
                                                                     jlong limit) {
    UNUSED(cls);
    const nm_api *api = api_of(api_address);
    const char *cpath = (*env)->GetStringUTFChars(env, path, NULL);
    if (cpath == NULL) {
        return 0;
    }
    nm_status st = NM_OK;
    char *err = NULL;
    const char *what = "";
    engine *e = engine_open(api, (nm_manager)manager, cpath, (int64_t)limit, &st, &err, &what);
    (*env)->ReleaseStringUTFChars(env, path, cpath);
    if (e == NULL) {
        throw_status(env, api, st, err, what); /* err is non-NULL only if the table is usable */
        return 0;
    }
    return (jlong)(uintptr_t)e;
}

/* Allocates `count` buffers of `size` bytes (64-aligned, written and read back) as spillable
 * memory, then grows the index reservation by `index_bytes`. Returns {buffers, bytes}. */
JNIEXPORT jlongArray JNICALL Java_org_nativemem_engine_CEngine_nativeAllocate(
    JNIEnv *env, jclass cls, jlong ptr, jint count, jlong size, jlong index_bytes) {
    UNUSED(cls);
    engine *e = engine_of(env, ptr);
    if (e == NULL) {
        return NULL;
    }
    const nm_api *api = e->api;
    char *err = NULL;
    nm_lease lease;
    nm_status st = lease_acquire(e, &lease, &err);
    if (st != NM_OK) {
        throw_status(env, api, st, err, "acquire");
        return NULL;
    }
    int64_t done = 0, bytes = 0;
    for (jint i = 0; i < count; i++) {
        void *p = NULL;
        st = api->allocate(e->pool, (uint64_t)size, ALIGN, &p, &err);
        if (st != NM_OK) {
            lease_release(e, lease);
            throw_status(env, api, st, err, "allocate");
            return NULL;
        }
        if (((uintptr_t)p % ALIGN) != 0) {
            api->free(e->pool, p, NULL, NULL);
            lease_release(e, lease);
            throw_state(env, "allocate returned memory that is not 64-byte aligned");
            return NULL;
        }
        unsigned char pattern = (unsigned char)(0xA5 ^ (unsigned)i);
        memset(p, pattern, (size_t)size);
        const unsigned char *c = p;
        if (c[0] != pattern || c[size - 1] != pattern || c[size / 2] != pattern) {
            lease_release(e, lease);
            throw_state(env, "allocated memory did not keep what was written");
            return NULL;
        }
        if (push_buffer(e, p, (uint64_t)size) != 0) {
            api->free(e->pool, p, NULL, NULL);
            lease_release(e, lease);
            throw_state(env, "the engine's state was dropped (its manager closed)");
            return NULL;
        }
        done++;
        bytes += size;
    }
    if (index_bytes > 0) {
        pthread_mutex_lock(&e->mu);
        nm_reservation index = e->index;
        pthread_mutex_unlock(&e->mu);
        /* No lock across the call: the grow may spill this very engine on this thread. */
        st = index != 0 ? api->reservation_try_grow(index, (uint64_t)index_bytes, &err)
                        : NM_ERR_STALE_HANDLE;
        if (st != NM_OK) {
            lease_release(e, lease);
            throw_status(env, api, st, err, "reservation_try_grow(index)");
            return NULL;
        }
        pthread_mutex_lock(&e->mu);
        e->index_bytes += (uint64_t)index_bytes;
        pthread_mutex_unlock(&e->mu);
    }
    lease_release(e, lease);
    int64_t out[2] = {done, bytes};
    return long_array(env, out, 2);
}

/* Frees up to `count` spillable buffers (newest first) as an operator would when done with
 * them; returns the bytes freed. */
JNIEXPORT jlong JNICALL Java_org_nativemem_engine_CEngine_nativeFreeBuffers(JNIEnv *env, jclass cls,
                                                                          jlong ptr, jint count) {
    UNUSED(cls);
    engine *e = engine_of(env, ptr);
    if (e == NULL) {
        return 0;
    }
    char *err = NULL;
    nm_lease lease;
    nm_status st = lease_acquire(e, &lease, &err);
    if (st != NM_OK) {
        throw_status(env, e->api, st, err, "acquire");
        return 0;
    }
    size_t n = 0;
    uint64_t bytes = 0, freed = 0;
    pthread_mutex_lock(&e->mu);
    buffer *taken = take_buffers(e, UINT64_MAX, (size_t)count, &n, &bytes);
    pthread_mutex_unlock(&e->mu);
    for (size_t i = 0; i < n; i++) {
        uint64_t size = 0;
        st = e->api->free(e->pool, taken[i].ptr, &size, &err);
        if (st != NM_OK) {
            free(taken);
            lease_release(e, lease);
            throw_status(env, e->api, st, err, "free");
            return 0;
        }
        freed += size;
    }
    free(taken);
    lease_release(e, lease);
    return (jlong)freed;
}

/* Grows a new reservation to `bytes` in `steps` steps (past several reservation blocks), reads
 * the stats at the peak, shrinks it back in as many steps and closes it.
 * Returns {size at peak, pool used at peak, manager used at peak, manager reserved at peak,
 *          pool used after, manager used after, manager reserved after}. */
JNIEXPORT jlongArray JNICALL Java_org_nativemem_engine_CEngine_nativeGrowShrink(
    JNIEnv *env, jclass cls, jlong ptr, jlong bytes, jint steps) {
    UNUSED(cls);
    engine *e = engine_of(env, ptr);
    if (e == NULL) {
        return NULL;
    }
    const nm_api *api = e->api;
    char *err = NULL;
    const char *what = "acquire";
    nm_lease lease;
    nm_status st = lease_acquire(e, &lease, &err);
    if (st != NM_OK) {
        throw_status(env, api, st, err, what);
        return NULL;
    }
    nm_reservation r = 0;
    nm_pool_stats ps = {0, 0, 0};
    nm_manager_stats ms = {0, 0, 0, 0, 0};
    int64_t out[7] = {0};
    uint64_t size = 0;
    if (steps < 1) {
        steps = 1;
    }
    uint64_t step = (uint64_t)bytes / (uint64_t)steps;
    what = "reservation_new(work)";
    if ((st = api->reservation_new(e->pool, "CEngine.work", &r, &err)) != NM_OK) {
        goto fail;
    }
    what = "reservation_try_grow(work)";
    for (jint k = 0; k < steps; k++) {
        uint64_t n = k == steps - 1 ? (uint64_t)bytes - step * (uint64_t)(steps - 1) : step;
        if ((st = api->reservation_try_grow(r, n, &err)) != NM_OK) {
            goto fail;
        }
    }
    what = "stats at the peak";
    if ((st = api->reservation_size(r, &size, &err)) != NM_OK ||
        (st = api->pool_stats(e->pool, &ps, &err)) != NM_OK ||
        (st = api->manager_stats(lease, &ms, &err)) != NM_OK) {
        goto fail;
    }
    out[0] = (int64_t)size;
    out[1] = (int64_t)ps.used;
    out[2] = (int64_t)ms.used;
    out[3] = (int64_t)ms.reserved;
    what = "reservation_shrink(work)";
    for (jint k = 0; k < steps; k++) {
        uint64_t n = k == steps - 1 ? (uint64_t)bytes - step * (uint64_t)(steps - 1) : step;
        if ((st = api->reservation_shrink(r, n, &err)) != NM_OK) {
            goto fail;
        }
    }
    what = "reservation_close(work)";
    if ((st = api->reservation_close(r, &err)) != NM_OK) {
        goto fail;
    }
    r = 0;
    what = "stats after";
    if ((st = api->pool_stats(e->pool, &ps, &err)) != NM_OK ||
        (st = api->manager_stats(lease, &ms, &err)) != NM_OK) {
        goto fail;
    }
    out[4] = (int64_t)ps.used;
    out[5] = (int64_t)ms.used;
    out[6] = (int64_t)ms.reserved;
    lease_release(e, lease);
    return long_array(env, out, 7);

fail:
    if (r != 0) {
        api->reservation_close(r, NULL);
    }
    lease_release(e, lease);
    throw_status(env, api, st, err, what);
    return NULL;
}

/* Leaks on purpose: an allocation it forgets and a reservation it never closes. */
JNIEXPORT void JNICALL Java_org_nativemem_engine_CEngine_nativeLeak(JNIEnv *env, jclass cls,
                                                                  jlong ptr, jlong alloc_bytes,
                                                                  jlong reservation_bytes) {
    UNUSED(cls);
    engine *e = engine_of(env, ptr);
    if (e == NULL) {
        return;
    }
    const nm_api *api = e->api;
    char *err = NULL;
    nm_lease lease;
    nm_status st = lease_acquire(e, &lease, &err);
    if (st != NM_OK) {
        throw_status(env, api, st, err, "acquire");
        return;
    }
    void *p = NULL;
    nm_reservation r = 0;
    if (alloc_bytes > 0) {
        if ((st = api->allocate(e->pool, (uint64_t)alloc_bytes, ALIGN, &p, &err)) != NM_OK) {
            lease_release(e, lease);
            throw_status(env, api, st, err, "allocate(leak)");
            return;
        }
        memset(p, 0x1e, (size_t)alloc_bytes);
    }
    if (reservation_bytes > 0) {
        if ((st = api->reservation_new(e->pool, "CEngine.leaked", &r, &err)) != NM_OK ||
            (st = api->reservation_try_grow(r, (uint64_t)reservation_bytes, &err)) != NM_OK) {
            lease_release(e, lease);
            throw_status(env, api, st, err, "reservation(leak)");
            return;
        }
    }
    pthread_mutex_lock(&e->mu);
    if (p != NULL) {
        e->leak_ptr = p;
        e->leaked_alloc_bytes += (uint64_t)alloc_bytes;
    }
    if (r != 0) {
        e->leak_res = r;
        e->leaked_reservation_bytes += (uint64_t)reservation_bytes;
    }
    pthread_mutex_unlock(&e->mu);
    lease_release(e, lease);
}

/* See CEngine.Stats for the order. Pool and manager read-outs need a lease: if the manager is
 * gone they are -1 and [0] carries the acquire status. */
#define STATS_FIELDS 26
JNIEXPORT jlongArray JNICALL Java_org_nativemem_engine_CEngine_nativeStats(JNIEnv *env, jclass cls,
                                                                         jlong ptr) {
    UNUSED(cls);
    engine *e = engine_of(env, ptr);
    if (e == NULL) {
        return NULL;
    }
    int64_t v[STATS_FIELDS];
    for (int i = 0; i < STATS_FIELDS; i++) {
        v[i] = -1;
    }
    nm_lease lease;
    nm_status st = lease_acquire(e, &lease, NULL);
    v[0] = st;
    if (st == NM_OK) {
        nm_pool_stats ps;
        nm_manager_stats ms;
        if (e->api->pool_stats(e->pool, &ps, NULL) == NM_OK) {
            v[1] = (int64_t)ps.used;
            v[2] = (int64_t)ps.peak;
            v[3] = ps.limit;
        }
        if (e->api->manager_stats(lease, &ms, NULL) == NM_OK) {
            v[4] = (int64_t)ms.used;
            v[5] = (int64_t)ms.peak;
            v[6] = (int64_t)ms.reserved;
            v[7] = (int64_t)ms.spill_count;
            v[8] = (int64_t)ms.spilled_bytes;
        }
        lease_release(e, lease);
    }
    pthread_mutex_lock(&e->mu);
    v[9] = (int64_t)e->spill_calls;
    v[10] = (int64_t)e->spills;
    v[11] = (int64_t)e->spilled_bytes;
    v[12] = (int64_t)e->spill_errors;
    v[13] = (int64_t)e->nbufs;
    v[14] = (int64_t)e->buf_bytes;
    v[15] = (int64_t)e->index_bytes;
    v[16] = (int64_t)e->spiller_dropped;
    v[17] = (int64_t)e->state_dropped;
    v[18] = (int64_t)e->drop_freed_bytes;
    v[19] = (int64_t)e->drop_freed_buffers;
    v[20] = (int64_t)e->drop_errors;
    v[21] = (int64_t)e->leaked_alloc_bytes;
    v[22] = (int64_t)e->leaked_reservation_bytes;
    v[23] = (int64_t)atomic_load(&e->refs);
    v[24] = (int64_t)e->manager;
    v[25] = (int64_t)e->pool;
    pthread_mutex_unlock(&e->mu);
    return long_array(env, v, STATS_FIELDS);
}

JNIEXPORT void JNICALL Java_org_nativemem_engine_CEngine_nativeSetSpillBehaviour(
    JNIEnv *env, jclass cls, jlong ptr, jlong over_report, jint status) {
    UNUSED(cls);
    engine *e = engine_of(env, ptr);
    if (e == NULL) {
        return;
    }
    pthread_mutex_lock(&e->mu);
    e->over_report = (uint64_t)over_report;
    e->spill_status = (nm_status)status;
    pthread_mutex_unlock(&e->mu);
}

/* Explicit end of the engine while its manager is open: unregisters the spiller, detaches the
 * state running its drop, closes the pool handle. Returns the acquire status (non-zero: the
 * manager is closing or closed, and its close drops the engine). */
JNIEXPORT jint JNICALL Java_org_nativemem_engine_CEngine_nativeShutdown(JNIEnv *env, jclass cls,
                                                                      jlong ptr) {
    UNUSED(cls);
    engine *e = engine_of(env, ptr);
    if (e == NULL) {
        return 0;
    }
    pthread_mutex_lock(&e->mu);
    int already = e->shut_down || e->state_dropped;
    e->shut_down = 1;
    pthread_mutex_unlock(&e->mu);
    if (already) {
        return NM_OK;
    }
    nm_lease lease;
    nm_status st = lease_acquire(e, &lease, NULL);
    if (st != NM_OK) {
        return st;
    }
    char *err = NULL;
    if ((st = e->api->spiller_unregister(e->spiller, &err)) != NM_OK) {
        lease_release(e, lease);
        throw_status(env, e->api, st, err, "spiller_unregister");
        return st;
    }
    if ((st = e->api->detach(e->state, 1, &err)) != NM_OK) {
        lease_release(e, lease);
        throw_status(env, e->api, st, err, "detach");
        return st;
    }
    if ((st = e->api->pool_close(e->pool, &err)) != NM_OK) {
        lease_release(e, lease);
        throw_status(env, e->api, st, err, "pool_close");
        return st;
    }
    lease_release(e, lease);
    return NM_OK;
}

/* Java's reference ends. */
JNIEXPORT void JNICALL Java_org_nativemem_engine_CEngine_nativeDispose(JNIEnv *env, jclass cls,
                                                                     jlong ptr) {
    UNUSED(env);
    UNUSED(cls);
    if (ptr != 0) {
        engine_unref((engine *)(uintptr_t)ptr);
    }
}

JNIEXPORT jlongArray JNICALL Java_org_nativemem_engine_CEngine_nativeGlobalStats(JNIEnv *env,
                                                                               jclass cls) {
    UNUSED(cls);
    int64_t v[8] = {
        (int64_t)atomic_load(&g_opened),      (int64_t)atomic_load(&g_structs_freed),
        (int64_t)atomic_load(&g_state_drops), (int64_t)atomic_load(&g_spiller_drops),
        (int64_t)atomic_load(&g_spills),      (int64_t)atomic_load(&g_spilled_bytes),
        (int64_t)atomic_load(&g_drop_freed_bytes), (int64_t)atomic_load(&g_drop_errors),
    };
    return long_array(env, v, 8);
}

/* ---- threads the JVM never saw ----------------------------------------------------------------- */

typedef struct worker {
    engine *e;
    int iterations;
    uint64_t grow, alloc;
    uint64_t ok, oom, errors, allocs;
    nm_status first_error;
    pthread_t thread;
} worker;

static void worker_error(worker *w, nm_status st) {
    w->errors++;
    if (w->first_error == NM_OK) {
        w->first_error = st;
    }
}

static void *worker_main(void *arg) {
    worker *w = arg;
    engine *e = w->e;
    const nm_api *api = e->api;
    nm_lease lease;
    nm_status st = api->acquire(e->manager, &lease, NULL); /* a lease of this thread's own */
    if (st != NM_OK) {
        worker_error(w, st);
        return NULL;
    }
    nm_reservation r = 0;
    if ((st = api->reservation_new(e->pool, "CEngine.thread", &r, NULL)) != NM_OK) {
        worker_error(w, st);
        api->release(lease, NULL);
        return NULL;
    }
    for (int i = 0; i < w->iterations; i++) {
        st = api->reservation_try_grow(r, w->grow, NULL); /* may spill this engine, here */
        if (st == NM_OK) {
            w->ok++;
            if ((st = api->reservation_shrink(r, w->grow, NULL)) != NM_OK) {
                worker_error(w, st);
            }
        } else if (st == NM_ERR_OUT_OF_MEMORY) {
            w->oom++;
        } else {
            worker_error(w, st);
        }
        if (w->alloc > 0 && i % 4 == 0) {
            void *p = NULL;
            st = api->allocate(e->pool, w->alloc, ALIGN, &p, NULL);
            if (st == NM_OK) {
                memset(p, 0x3c, (size_t)w->alloc);
                if (push_buffer(e, p, w->alloc) != 0) {
                    api->free(e->pool, p, NULL, NULL);
                } else {
                    w->allocs++;
                }
            } else if (st == NM_ERR_OUT_OF_MEMORY) {
                w->oom++;
            } else {
                worker_error(w, st);
            }
        }
    }
    uint64_t left = 1;
    if ((st = api->reservation_size(r, &left, NULL)) != NM_OK || left != 0) {
        worker_error(w, st != NM_OK ? st : NM_ERR_INTERNAL);
    }
    if ((st = api->reservation_close(r, NULL)) != NM_OK) {
        worker_error(w, st);
    }
    if ((st = api->release(lease, NULL)) != NM_OK) {
        worker_error(w, st);
    }
    return NULL;
}

/* Starts `threads` pthreads that each, with a lease of their own, grow/shrink a reservation of
 * the engine's pool `iterations` times by `grow` bytes and every 4th iteration allocate a
 * spillable buffer of `alloc` bytes (so grows of one thread spill buffers of others).
 * Returns {successful grows, out-of-memory, other errors, first other error status, buffers}. */
JNIEXPORT jlongArray JNICALL Java_org_nativemem_engine_CEngine_nativeRunThreads(
    JNIEnv *env, jclass cls, jlong ptr, jint threads, jint iterations, jlong grow, jlong alloc) {
    UNUSED(cls);
    engine *e = engine_of(env, ptr);
    if (e == NULL) {
        return NULL;
    }
    if (threads < 1 || threads > 64) {
        throw_state(env, "threads must be in 1..64");
        return NULL;
    }
    worker *ws = calloc((size_t)threads, sizeof *ws);
    if (ws == NULL) {
        throw_state(env, "calloc(workers)");
        return NULL;
    }
    int started = 0;
    for (int i = 0; i < threads; i++) {
        ws[i].e = e;
        ws[i].iterations = iterations;
        ws[i].grow = (uint64_t)grow;
        ws[i].alloc = (uint64_t)alloc;
        if (pthread_create(&ws[i].thread, NULL, worker_main, &ws[i]) != 0) {
            break;
        }
        started++;
    }
    int64_t out[5] = {0, 0, 0, 0, 0};
    for (int i = 0; i < started; i++) {
        pthread_join(ws[i].thread, NULL);
        out[0] += (int64_t)ws[i].ok;
        out[1] += (int64_t)ws[i].oom;
        out[2] += (int64_t)ws[i].errors;
        if (out[3] == 0) {
            out[3] = ws[i].first_error;
        }
        out[4] += (int64_t)ws[i].allocs;
    }
    free(ws);
    if (started != threads) {
        throw_state(env, "pthread_create failed");
        return NULL;
    }
    return long_array(env, out, 5);
}

/* ---- a lease held across the manager's close ------------------------------------------------------ */

typedef struct holder {
    engine *e;
    uint64_t bytes;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int holding, let_go, done;
    nm_status acquire_st, alloc_st;
    /* after the close gave up waiting, still holding the lease: */
    int pattern_ok_before, pattern_ok_after;
    nm_status alloc_during_close, free_during_close, stats_during_close;
    uint64_t used_during_close;
    nm_status release_st;
    uint64_t state_drops_before, state_drops_after;
    int drop_ran_here;
} holder;

static void *holder_main(void *arg) {
    holder *h = arg;
    engine *e = h->e;
    const nm_api *api = e->api;
    nm_lease lease = 0;
    void *p = NULL;
    h->acquire_st = api->acquire(e->manager, &lease, NULL);
    if (h->acquire_st == NM_OK) {
        h->alloc_st = api->allocate(e->pool, h->bytes, ALIGN, &p, NULL);
        if (h->alloc_st == NM_OK) {
            memset(p, 0x77, (size_t)h->bytes);
        }
    }
    pthread_mutex_lock(&h->mu);
    h->holding = 1;
    pthread_cond_broadcast(&h->cv);
    while (!h->let_go) {
        pthread_cond_wait(&h->cv, &h->mu);
    }
    pthread_mutex_unlock(&h->mu);
    if (h->acquire_st == NM_OK) {
        /* The manager's close has given up waiting for us: nothing was freed under us. */
        h->pattern_ok_before = p != NULL && check_pattern(p, h->bytes, 0x77);
        void *q = NULL;
        h->alloc_during_close = api->allocate(e->pool, 4096, ALIGN, &q, NULL);
        if (h->alloc_during_close == NM_OK) {
            api->free(e->pool, q, NULL, NULL);
        }
        nm_manager_stats ms = {0, 0, 0, 0, 0};
        h->stats_during_close = api->manager_stats(lease, &ms, NULL);
        h->used_during_close = ms.used; /* 0 when refused (the manager is closing) */
        /* A give-back: let in while the close still waits for this lease, so it is no leak. */
        h->free_during_close = p != NULL ? api->free(e->pool, p, NULL, NULL) : NM_ERR_INTERNAL;
        h->pattern_ok_after =
            h->free_during_close != NM_OK && p != NULL && check_pattern(p, h->bytes, 0x77);
        pthread_mutex_lock(&e->mu);
        h->state_drops_before = e->state_dropped;
        pthread_mutex_unlock(&e->mu);
        /* The last lease ends: the deferred close runs now, on this thread. */
        h->release_st = api->release(lease, NULL);
        pthread_mutex_lock(&e->mu);
        h->state_drops_after = e->state_dropped;
        h->drop_ran_here = e->state_dropped > 0 && pthread_equal(e->drop_thread, pthread_self());
        pthread_mutex_unlock(&e->mu);
    }
    pthread_mutex_lock(&h->mu);
    h->done = 1;
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

/* Starts a pthread that acquires a lease, allocates `bytes` and holds both until let go;
 * returns once it holds them (or failed: see the join result). */
JNIEXPORT jlong JNICALL Java_org_nativemem_engine_CEngine_nativeHoldLease(JNIEnv *env, jclass cls,
                                                                        jlong ptr, jlong bytes) {
    UNUSED(cls);
    engine *e = engine_of(env, ptr);
    if (e == NULL) {
        return 0;
    }
    holder *h = calloc(1, sizeof *h);
    if (h == NULL) {
        throw_state(env, "calloc(holder)");
        return 0;
    }
    h->e = e;
    h->bytes = (uint64_t)bytes;
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->cv, NULL);
    atomic_fetch_add(&e->refs, 1); /* the holder's, until joined */
    if (pthread_create(&h->thread, NULL, holder_main, h) != 0) {
        atomic_fetch_sub(&e->refs, 1);
        free(h);
        throw_state(env, "pthread_create failed");
        return 0;
    }
    pthread_mutex_lock(&h->mu);
    while (!h->holding) {
        pthread_cond_wait(&h->cv, &h->mu);
    }
    pthread_mutex_unlock(&h->mu);
    return (jlong)(uintptr_t)h;
}

/* Lets the holder go and joins it. Returns {acquire, allocate, pattern intact after the close
 * returned, allocate while closing, manager_stats while closing, used while closing, free while
 * closing, pattern intact after that, release, state drops before release, after release, drop
 * ran on the holder's thread}. */
JNIEXPORT jlongArray JNICALL Java_org_nativemem_engine_CEngine_nativeReleaseHolder(JNIEnv *env,
                                                                                 jclass cls,
                                                                                 jlong hptr) {
    UNUSED(cls);
    holder *h = (holder *)(uintptr_t)hptr;
    if (h == NULL) {
        throw_state(env, "no holder");
        return NULL;
    }
    pthread_mutex_lock(&h->mu);
    h->let_go = 1;
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
    pthread_join(h->thread, NULL);
    int64_t out[12] = {
        h->acquire_st,          h->alloc_st,           h->pattern_ok_before,
        h->alloc_during_close,  h->stats_during_close, (int64_t)h->used_during_close,
        h->free_during_close,   h->pattern_ok_after,   h->release_st,
        (int64_t)h->state_drops_before, (int64_t)h->state_drops_after, h->drop_ran_here,
    };
    engine_unref(h->e);
    pthread_mutex_destroy(&h->mu);
    pthread_cond_destroy(&h->cv);
    free(h);
    return long_array(env, out, 12);
}

/* ---- a manager without a JVM (manager_create): leak bytes as a number ---------------------------- */

typedef struct c_listener {
    atomic_ullong reserved, reserve_calls, unreserve_calls;
    atomic_int dropped;
} c_listener;

static nm_status cl_reserve(void *ctx, uint64_t bytes, uint64_t *granted) {
    c_listener *cl = ctx;
    atomic_fetch_add(&cl->reserve_calls, 1);
    atomic_fetch_add(&cl->reserved, bytes);
    *granted = bytes;
    return NM_OK;
}

static nm_status cl_unreserve(void *ctx, uint64_t bytes) {
    c_listener *cl = ctx;
    atomic_fetch_add(&cl->unreserve_calls, 1);
    atomic_fetch_sub(&cl->reserved, bytes);
    return NM_OK;
}

static void cl_drop(void *ctx) {
    c_listener *cl = ctx;
    atomic_fetch_add(&cl->dropped, 1);
}

/* Runs the engine on a manager made with manager_create (a C listener), leaks on purpose and
 * closes it with manager_close, which gives the leak as a number. report[0] gets the report.
 * Returns {close status, leaked bytes, listener reserved before close, listener reserved after,
 * listener drops, state drops, spiller drops, bytes the drop freed, engine buffers + index
 * before close, manager used before close, acquire after close, manager_close again}. */
JNIEXPORT jlongArray JNICALL Java_org_nativemem_engine_CEngine_nativeEmbedded(
    JNIEnv *env, jclass cls, jlong api_address, jlong block, jint buffers, jlong buffer_size,
    jlong index_bytes, jlong leak_alloc, jlong leak_reservation, jobjectArray report) {
    UNUSED(cls);
    const nm_api *api = api_of(api_address);
    nm_status st = nm_api_check(api);
    if (st != NM_OK) {
        throw_status(env, NULL, st, NULL, "nm_api_check");
        return NULL;
    }
    c_listener *cl = calloc(1, sizeof *cl);
    if (cl == NULL) {
        throw_state(env, "calloc");
        return NULL;
    }
    nm_listener listener = {
        .struct_size = (uint32_t)sizeof(nm_listener),
        .reserved0 = 0,
        .ctx = cl,
        .reserve = cl_reserve,
        .unreserve = cl_unreserve,
        .drop = cl_drop,
    };
    char *err = NULL;
    nm_manager m = 0;
    if ((st = api->manager_create("c-embedded", (uint64_t)block, -1, &listener, &m, &err)) != NM_OK) {
        free(cl);
        throw_status(env, api, st, err, "manager_create");
        return NULL;
    }
    const char *what = "";
    engine *e = engine_open(api, m, "embedded/engine", -1, &st, &err, &what);
    if (e == NULL) {
        api->manager_close(m, NULL, NULL, NULL);
        throw_status(env, api, st, err, what);
        return NULL; /* cl leaks if its drop did not run; only on this failure path */
    }
    jlong eptr = (jlong)(uintptr_t)e;
    jlongArray a = Java_org_nativemem_engine_CEngine_nativeAllocate(env, cls, eptr, buffers,
                                                                    buffer_size, index_bytes);
    if (a != NULL) {
        (*env)->DeleteLocalRef(env, a);
        Java_org_nativemem_engine_CEngine_nativeLeak(env, cls, eptr, leak_alloc, leak_reservation);
    }
    int64_t v[12];
    nm_lease l;
    nm_manager_stats ms = {0, 0, 0, 0, 0};
    if (api->acquire(m, &l, NULL) == NM_OK) {
        api->manager_stats(l, &ms, NULL);
        api->release(l, NULL);
    }
    v[9] = (int64_t)ms.used;
    pthread_mutex_lock(&e->mu);
    v[8] = (int64_t)(e->buf_bytes + e->index_bytes);
    pthread_mutex_unlock(&e->mu);
    v[2] = (int64_t)atomic_load(&cl->reserved);
    char *text = NULL;
    uint64_t leaked = 0;
    v[0] = api->manager_close(m, &text, &leaked, &err);
    api->free_message(err);
    err = NULL;
    v[1] = (int64_t)leaked;
    v[3] = (int64_t)atomic_load(&cl->reserved);
    v[4] = atomic_load(&cl->dropped);
    pthread_mutex_lock(&e->mu);
    v[5] = (int64_t)e->state_dropped;
    v[6] = (int64_t)e->spiller_dropped;
    v[7] = (int64_t)e->drop_freed_bytes;
    pthread_mutex_unlock(&e->mu);
    v[10] = api->acquire(m, &l, NULL);
    v[11] = api->manager_close(m, NULL, NULL, NULL);
    if (report != NULL && (*env)->GetArrayLength(env, report) > 0 && text != NULL &&
        !(*env)->ExceptionCheck(env)) {
        jstring s = (*env)->NewStringUTF(env, text);
        if (s != NULL) {
            (*env)->SetObjectArrayElement(env, report, 0, s);
        }
    }
    api->free_message(text);
    engine_unref(e); /* Java never saw this engine: drop the "Java" reference here */
    if (v[4] == 1) {
        free(cl);
    }
    if ((*env)->ExceptionCheck(env)) {
        return NULL;
    }
    return long_array(env, v, 12);
}


/* ---- untracked memory: a malloc hook's batching over the forced charges -------------------------- */

/*
 * What a C/C++ engine's allocation hook does with reservation_force_grow / _force_shrink (see the
 * header and the README, "Untracked native memory"): it charges the task's pool for what the
 * engine mallocs, batched (one call per HOOK_BATCH bytes of change, not one per malloc), never
 * failing the malloc and never calling Spark. `plain` is memory the engine mallocs without the hook:
 * nativemem never sees it; the executor's "untracked" gauge does.
 */
#define HOOK_BATCH (1u << 20)
#define HOOK_BLOCK (1u << 20)

typedef struct untracked {
    const nm_api *api;
    nm_pool pool;
    nm_reservation res;
    int64_t delta;          /* hook batch: bytes malloc'd minus freed, not yet charged */
    uint64_t overcommitted; /* what the forced grows reported as over-commit */
    uint64_t force_calls;
    uint64_t released;      /* what the forced shrinks released */
    void *plain;
    uint64_t plain_bytes;
    void **blocks;
    size_t nblocks;
} untracked;

static void hook_flush(untracked *u) {
    if (u->delta > 0) {
        uint64_t over = 0;
        if (u->api->reservation_force_grow(u->res, (uint64_t)u->delta, &over, NULL) == NM_OK) {
            u->overcommitted += over;
        }
        u->force_calls++;
    } else if (u->delta < 0) {
        uint64_t released = 0;
        if (u->api->reservation_force_shrink(u->res, (uint64_t)(-u->delta), &released, NULL) == NM_OK) {
            u->released += released;
        }
        u->force_calls++;
    }
    u->delta = 0;
}

static void *hook_malloc(untracked *u, size_t size) {
    void *p = malloc(size);
    if (p != NULL) {
        u->delta += (int64_t)size;
        if (u->delta > (int64_t)HOOK_BATCH) {
            hook_flush(u);
        }
    }
    return p;
}

static void hook_free(untracked *u, void *p, size_t size) {
    if (p == NULL) {
        return;
    }
    free(p);
    u->delta -= (int64_t)size;
    if (u->delta < -(int64_t)HOOK_BATCH) {
        hook_flush(u);
    }
}

/* Mallocs `plain_bytes` without the hook and `tracked_bytes` in 1 MiB blocks through it, all
 * written (resident). Returns the holder. */
JNIEXPORT jlong JNICALL Java_org_nativemem_engine_CEngine_nativeUntrackedOpen(
    JNIEnv *env, jclass cls, jlong api_address, jlong manager, jlong plain_bytes, jlong tracked_bytes) {
    UNUSED(cls);
    const nm_api *api = api_of(api_address);
    if (nm_api_check(api) != NM_OK || !NM_API_HAS(api, reservation_force_shrink)) {
        throw_status(env, NULL, NM_ERR_UNSUPPORTED, NULL, "nm_api_check");
        return 0;
    }
    if (plain_bytes < 0 || tracked_bytes < 0) {
        throw_state(env, "negative size");
        return 0;
    }
    untracked *u = calloc(1, sizeof *u);
    if (u == NULL) {
        throw_state(env, "calloc(untracked)");
        return 0;
    }
    u->api = api;
    char *err = NULL;
    nm_lease lease = 0;
    nm_status st = api->acquire((nm_manager)manager, &lease, &err);
    if (st != NM_OK) {
        free(u);
        throw_status(env, api, st, err, "acquire");
        return 0;
    }
    st = api->pool_open(lease, "c-engine/untracked", -1, &u->pool, &err);
    if (st == NM_OK) {
        st = api->reservation_new(u->pool, "c malloc hook", &u->res, &err);
        if (st != NM_OK) {
            api->pool_close(u->pool, NULL);
        }
    }
    api->release(lease, NULL);
    if (st != NM_OK) {
        free(u);
        throw_status(env, api, st, err, "pool_open/reservation_new");
        return 0;
    }
    u->plain_bytes = (uint64_t)plain_bytes;
    u->plain = plain_bytes > 0 ? malloc((size_t)plain_bytes) : NULL;
    if (u->plain != NULL) {
        memset(u->plain, 0x5a, (size_t)plain_bytes);
    }
    size_t n = (size_t)(((uint64_t)tracked_bytes + HOOK_BLOCK - 1) / HOOK_BLOCK);
    u->blocks = n > 0 ? calloc(n, sizeof *u->blocks) : NULL;
    for (size_t i = 0; u->blocks != NULL && i < n; i++) {
        u->blocks[i] = hook_malloc(u, HOOK_BLOCK);
        if (u->blocks[i] == NULL) {
            break;
        }
        memset(u->blocks[i], (int)i, HOOK_BLOCK);
        u->nblocks++;
    }
    hook_flush(u); /* a hook would flush at its thread's end; here: so the pool is exact now */
    return (jlong)(uintptr_t)u;
}

/* {plain bytes held, hooked bytes held, over-committed reported, forced calls, reservation size}. */
JNIEXPORT jlongArray JNICALL Java_org_nativemem_engine_CEngine_nativeUntrackedStats(JNIEnv *env,
                                                                                  jclass cls,
                                                                                  jlong ptr) {
    UNUSED(cls);
    untracked *u = (untracked *)(uintptr_t)ptr;
    if (u == NULL) {
        throw_state(env, "no untracked holder");
        return NULL;
    }
    uint64_t size = 0;
    nm_status st = u->api->reservation_size(u->res, &size, NULL);
    int64_t out[5] = {
        u->plain != NULL ? (int64_t)u->plain_bytes : 0, (int64_t)(u->nblocks * (uint64_t)HOOK_BLOCK),
        (int64_t)u->overcommitted, (int64_t)u->force_calls, st == NM_OK ? (int64_t)size : -(int64_t)st,
    };
    return long_array(env, out, 5);
}

/* What the engine does after its hook's forced grows, outside the hook (where it may call out):
 * manager_cover_overcommit, so Spark reserves the over-commit at once rather than at the task's
 * next grow that reaches it. Returns the bytes granted; 0 with a library whose table lacks the
 * call (NM_API_HAS); throws CEngineException on a failure (a closed manager: acquire's status). */
JNIEXPORT jlong JNICALL Java_org_nativemem_engine_CEngine_nativeCoverOvercommit(JNIEnv *env,
                                                                             jclass cls,
                                                                             jlong api_address,
                                                                             jlong manager) {
    UNUSED(cls);
    const nm_api *api = api_of(api_address);
    if (nm_api_check(api) != NM_OK) {
        throw_status(env, NULL, NM_ERR_UNSUPPORTED, NULL, "nm_api_check");
        return 0;
    }
    if (!NM_API_HAS(api, manager_cover_overcommit)) {
        return 0;
    }
    char *err = NULL;
    nm_lease lease = 0;
    nm_status st = api->acquire((nm_manager)manager, &lease, &err);
    if (st != NM_OK) {
        throw_status(env, api, st, err, "acquire");
        return 0;
    }
    uint64_t granted = 0;
    st = api->manager_cover_overcommit(lease, &granted, &err);
    api->release(lease, NULL);
    if (st != NM_OK) {
        throw_status(env, api, st, err, "manager_cover_overcommit");
        return 0;
    }
    return (jlong)granted;
}

/* Frees everything (the hooked blocks through the hook), closes the handles. Returns {bytes the
 * forced shrinks released, forced calls in all, reservation size after the frees}. */
JNIEXPORT jlongArray JNICALL Java_org_nativemem_engine_CEngine_nativeUntrackedClose(JNIEnv *env,
                                                                                  jclass cls,
                                                                                  jlong ptr) {
    UNUSED(cls);
    untracked *u = (untracked *)(uintptr_t)ptr;
    if (u == NULL) {
        throw_state(env, "no untracked holder");
        return NULL;
    }
    for (size_t i = 0; i < u->nblocks; i++) {
        hook_free(u, u->blocks[i], HOOK_BLOCK);
    }
    hook_flush(u);
    uint64_t size = 0;
    nm_status st = u->api->reservation_size(u->res, &size, NULL);
    int64_t out[3] = {(int64_t)u->released, (int64_t)u->force_calls, st == NM_OK ? (int64_t)size : -(int64_t)st};
    u->api->reservation_close(u->res, NULL);
    u->api->pool_close(u->pool, NULL);
    free(u->blocks);
    free(u->plain);
    free(u);
    return long_array(env, out, 3);
}
