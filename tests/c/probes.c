/*
 * nm_test_engine's misuse probes: what the ABI must refuse, checked at the C level, where a
 * caller can do what Java cannot (forge a handle, pass NULL, doctor the table, reuse a stale
 * handle). Each probe returns the statuses it saw as a long[] for CEngineTest to assert; the
 * order of each array is given where it is built. See engine.c for the engine these probes run
 * against.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"

/* ---- misuse, checked at the C level ------------------------------------------------------------- */

/* Counts and frees a message. */
static void count_message(const nm_api *api, char **err, int64_t *messages) {
    if (*err != NULL) {
        (*messages)++;
        api->free_message(*err);
        *err = NULL;
    }
}

/* nm_api_check on the real table and on doctored copies. Returns {real, NULL, abi_version 0,
 * struct_size - 8, struct_size 0, abi_version + 1, struct_size + 64}. */
JNIEXPORT jlongArray JNICALL Java_org_nativemem_engine_CEngine_nativeApiCheck(JNIEnv *env,
                                                                            jclass cls,
                                                                            jlong api_address) {
    UNUSED(cls);
    const nm_api *api = api_of(api_address);
    int64_t out[7];
    out[0] = nm_api_check(api);
    out[1] = nm_api_check(NULL);
    /* A newer library's table is larger than ours: copy into room for that. */
    unsigned char *room = calloc(1, sizeof(nm_api) + 64);
    if (room == NULL) {
        throw_state(env, "calloc");
        return NULL;
    }
    nm_api *copy = (nm_api *)(void *)room;
    memcpy(copy, api, sizeof(nm_api));
    copy->abi_version = 0;
    out[2] = nm_api_check(copy);
    memcpy(copy, api, sizeof(nm_api));
    copy->struct_size = (uint32_t)(sizeof(nm_api) - 8);
    out[3] = nm_api_check(copy);
    memcpy(copy, api, sizeof(nm_api));
    copy->struct_size = 0;
    out[4] = nm_api_check(copy);
    memcpy(copy, api, sizeof(nm_api));
    copy->abi_version = NM_ABI_VERSION + 1;
    out[5] = nm_api_check(copy);
    memcpy(copy, api, sizeof(nm_api));
    copy->struct_size = (uint32_t)(sizeof(nm_api) + 64);
    out[6] = nm_api_check(copy);
    free(room);
    return long_array(env, out, 7);
}

/* Forged, zero and wrong-kind handles and bad arguments on a live manager. See CEngineTest for
 * the meaning of each entry. */
#define FORGED_FIELDS 24
JNIEXPORT jlongArray JNICALL Java_org_nativemem_engine_CEngine_nativeForged(JNIEnv *env, jclass cls,
                                                                          jlong api_address,
                                                                          jlong manager) {
    UNUSED(cls);
    const nm_api *api = api_of(api_address);
    int64_t v[FORGED_FIELDS];
    int64_t messages = 0;
    char *err = NULL;
    nm_lease l = 0;
    nm_pool_stats ps;
    nm_manager_stats ms;
    uint64_t x = 0;
    int dummy = 0;
    nm_manager mgr = (nm_manager)manager;
    for (int i = 0; i < FORGED_FIELDS; i++) {
        v[i] = -1;
    }

    v[0] = api->acquire(0, &l, &err); count_message(api, &err, &messages);
    v[1] = api->acquire(0x1234, &l, &err); count_message(api, &err, &messages);
    v[2] = api->acquire(UINT64_MAX, &l, &err); count_message(api, &err, &messages);
    /* Same kind and slot, a generation the slot has not reached: never issued. */
    v[3] = api->acquire(mgr + ((uint64_t)1000 << 24), &l, &err); count_message(api, &err, &messages);
    v[4] = api->pool_stats(0x1234, &ps, &err); count_message(api, &err, &messages);
    v[5] = api->pool_stats(mgr, &ps, &err); count_message(api, &err, &messages); /* wrong kind */
    v[6] = api->reservation_try_grow(0, 1, &err); count_message(api, &err, &messages);
    v[7] = api->free(0x1234, &dummy, &x, &err); count_message(api, &err, &messages);
    v[8] = api->spiller_unregister(0x1234, &err); count_message(api, &err, &messages);
    v[9] = api->detach(0x1234, 1, &err); count_message(api, &err, &messages);
    v[10] = api->release(0x1234, &err); count_message(api, &err, &messages);
    v[11] = api->manager_stats(mgr, &ms, &err); count_message(api, &err, &messages); /* not a lease */
    v[12] = api->acquire(mgr, NULL, &err); count_message(api, &err, &messages);
    v[13] = api->acquire(0x1234, &l, NULL); /* no message wanted: none made, no crash */

    /* Success sets *err to NULL, whatever it held. */
    err = (char *)&dummy;
    nm_status st = api->acquire(mgr, &l, &err);
    v[14] = st == NM_OK && err == NULL;
    if (st != NM_OK) {
        throw_state(env, "acquire of the live manager failed");
        return NULL;
    }
    err = NULL;
    nm_pool pool = 0;
    nm_reservation r = 0;
    v[15] = api->pool_open(l, NULL, -1, &pool, &err); count_message(api, &err, &messages);
    v[16] = api->pool_open(l, "forged//empty", -1, &pool, &err); count_message(api, &err, &messages);
    v[17] = api->pool_open(l, "forged/limit", -2, &pool, &err); count_message(api, &err, &messages);
    if (api->pool_open(l, "forged/ok", -1, &pool, NULL) == NM_OK) {
        void *p = (void *)&dummy;
        v[18] = api->allocate(pool, 0, 64, &p, &err); count_message(api, &err, &messages);
        v[19] = p == NULL; /* on failure *out is NULL */
        v[20] = api->allocate(pool, 64, 3, &p, &err); count_message(api, &err, &messages);
        if (api->reservation_new(pool, "forged", &r, NULL) == NM_OK) {
            v[21] = api->reservation_shrink(r, 1, &err); count_message(api, &err, &messages);
            api->reservation_close(r, NULL);
        }
        v[22] = api->reservation_try_grow(pool, 1, &err); count_message(api, &err, &messages);
        api->pool_close(pool, NULL);
    }
    api->release(l, NULL);
    v[23] = messages;
    return long_array(env, v, FORGED_FIELDS);
}

/* A lease released twice. Returns {acquire, release, release again, manager_stats on it}. */
JNIEXPORT jlongArray JNICALL Java_org_nativemem_engine_CEngine_nativeReleaseTwice(
    JNIEnv *env, jclass cls, jlong api_address, jlong manager) {
    UNUSED(cls);
    const nm_api *api = api_of(api_address);
    nm_lease l = 0;
    nm_manager_stats ms;
    char *err = NULL;
    int64_t v[4];
    v[0] = api->acquire((nm_manager)manager, &l, NULL);
    v[1] = api->release(l, NULL);
    v[2] = api->release(l, &err);
    api->free_message(err);
    err = NULL;
    v[3] = api->manager_stats(l, &ms, &err);
    api->free_message(err);
    return long_array(env, v, 4);
}

/* Spiller vtables the ABI must refuse, and their ctx must stay the caller's (no drop). */
static atomic_int g_probe_drops;
static uint64_t probe_spillable(void *ctx) {
    UNUSED(ctx);
    return 0;
}
static nm_status probe_spill(void *ctx, uint64_t target, uint64_t *freed) {
    UNUSED(ctx);
    UNUSED(target);
    *freed = 0;
    return NM_OK;
}
static void probe_drop(void *ctx) {
    UNUSED(ctx);
    atomic_fetch_add(&g_probe_drops, 1);
}

/* Returns {struct_size - 8, struct_size 0, spill NULL, spillable_bytes NULL, vtable NULL,
 * name NULL, drops after the refusals, larger struct_size (newer header) accepted, drops after
 * its unregister, unregister again, drops after that}. */
JNIEXPORT jlongArray JNICALL Java_org_nativemem_engine_CEngine_nativeVtableChecks(
    JNIEnv *env, jclass cls, jlong api_address, jlong manager) {
    UNUSED(cls);
    const nm_api *api = api_of(api_address);
    int64_t v[11];
    for (int i = 0; i < 11; i++) {
        v[i] = -1;
    }
    nm_lease l;
    nm_pool pool;
    char *err = NULL;
    nm_status st = api->acquire((nm_manager)manager, &l, &err);
    if (st != NM_OK) {
        throw_status(env, api, st, err, "acquire");
        return NULL;
    }
    if ((st = api->pool_open(l, "vtable-probe", -1, &pool, &err)) != NM_OK) {
        api->release(l, NULL);
        throw_status(env, api, st, err, "pool_open");
        return NULL;
    }
    atomic_store(&g_probe_drops, 0);
    int ctx = 0;
    nm_spiller s = 0;
    /* A vtable from a newer header: larger, with a field this library does not know (zero). */
    struct {
        nm_spiller_vtable vt;
        void *newer_field;
    } big;
    memset(&big, 0, sizeof big);
    nm_spiller_vtable good = {
        .struct_size = (uint32_t)sizeof(nm_spiller_vtable),
        .reserved0 = 0,
        .ctx = &ctx,
        .spillable_bytes = probe_spillable,
        .spill = probe_spill,
        .drop = probe_drop,
    };
    nm_spiller_vtable bad = good;
    bad.struct_size = (uint32_t)sizeof(nm_spiller_vtable) - 8;
    v[0] = api->spiller_register(pool, "probe", &bad, &s, &err); api->free_message(err); err = NULL;
    bad = good;
    bad.struct_size = 0;
    v[1] = api->spiller_register(pool, "probe", &bad, &s, &err); api->free_message(err); err = NULL;
    bad = good;
    bad.spill = NULL;
    v[2] = api->spiller_register(pool, "probe", &bad, &s, &err); api->free_message(err); err = NULL;
    bad = good;
    bad.spillable_bytes = NULL;
    v[3] = api->spiller_register(pool, "probe", &bad, &s, &err); api->free_message(err); err = NULL;
    v[4] = api->spiller_register(pool, "probe", NULL, &s, &err); api->free_message(err); err = NULL;
    v[5] = api->spiller_register(pool, NULL, &good, &s, &err); api->free_message(err); err = NULL;
    v[6] = atomic_load(&g_probe_drops);
    big.vt = good;
    big.vt.struct_size = (uint32_t)sizeof big;
    v[7] = api->spiller_register(pool, "probe-newer", &big.vt, &s, &err);
    api->free_message(err);
    err = NULL;
    if (v[7] == NM_OK) {
        api->spiller_unregister(s, NULL);
        v[8] = atomic_load(&g_probe_drops);
        v[9] = api->spiller_unregister(s, &err);
        api->free_message(err);
        err = NULL;
        v[10] = atomic_load(&g_probe_drops);
    }
    api->pool_close(pool, NULL);
    api->release(l, NULL);
    return long_array(env, v, 11);
}

/* free() of pointers the manager does not own. Returns {free(malloc'd), malloc'd memory intact
 * afterwards (then freed with free()), pool used before, pool used after the refusals, free of an
 * interior pointer, free(NULL), free of the real allocation, free of it again (double free), pool
 * used at the end}. */
JNIEXPORT jlongArray JNICALL Java_org_nativemem_engine_CEngine_nativeForeignFree(JNIEnv *env,
                                                                               jclass cls,
                                                                               jlong ptr) {
    UNUSED(cls);
    engine *e = engine_of(env, ptr);
    if (e == NULL) {
        return NULL;
    }
    const nm_api *api = e->api;
    int64_t v[9];
    char *err = NULL;
    nm_lease l;
    nm_status st = lease_acquire(e, &l, &err);
    if (st != NM_OK) {
        throw_status(env, api, st, err, "acquire");
        return NULL;
    }
    nm_pool_stats ps = {0, 0, 0};
    api->pool_stats(e->pool, &ps, NULL);
    v[2] = (int64_t)ps.used;
    unsigned char *m = malloc(4096);
    if (m == NULL) {
        lease_release(e, l);
        throw_state(env, "malloc");
        return NULL;
    }
    memset(m, 0xc3, 4096);
    uint64_t size = 12345;
    v[0] = api->free(e->pool, m, &size, &err);
    api->free_message(err);
    err = NULL;
    v[1] = check_pattern(m, 4096, 0xc3) && size == 12345;
    free(m); /* still ours: the C library frees it fine */
    void *p = NULL;
    if ((st = api->allocate(e->pool, 8192, ALIGN, &p, &err)) != NM_OK) {
        lease_release(e, l);
        throw_status(env, api, st, err, "allocate");
        return NULL;
    }
    v[4] = api->free(e->pool, (unsigned char *)p + 64, NULL, &err);
    api->free_message(err);
    err = NULL;
    v[5] = api->free(e->pool, NULL, NULL, &err);
    api->free_message(err);
    err = NULL;
    api->pool_stats(e->pool, &ps, NULL);
    v[3] = (int64_t)ps.used;
    size = 0;
    v[6] = api->free(e->pool, p, &size, NULL);
    v[7] = api->free(e->pool, p, NULL, &err); /* double free: refused, nothing touched */
    api->free_message(err);
    err = NULL;
    api->pool_stats(e->pool, &ps, NULL);
    v[8] = (int64_t)ps.used;
    lease_release(e, l);
    return long_array(env, v, 9);
}

/* Frees an allocation of engine a's manager through engine b's pool (another manager), then
 * through its own. Returns {free through b, free through a}. */
JNIEXPORT jlongArray JNICALL Java_org_nativemem_engine_CEngine_nativeCrossFree(JNIEnv *env,
                                                                             jclass cls, jlong pa,
                                                                             jlong pb) {
    UNUSED(cls);
    engine *a = engine_of(env, pa);
    engine *b = a != NULL ? engine_of(env, pb) : NULL;
    if (b == NULL) {
        return NULL;
    }
    char *err = NULL;
    nm_lease la, lb;
    nm_status st = lease_acquire(a, &la, &err);
    if (st != NM_OK) {
        throw_status(env, a->api, st, err, "acquire(a)");
        return NULL;
    }
    if ((st = lease_acquire(b, &lb, &err)) != NM_OK) {
        lease_release(a, la);
        throw_status(env, a->api, st, err, "acquire(b)");
        return NULL;
    }
    void *p = NULL;
    int64_t v[2] = {-1, -1};
    if ((st = a->api->allocate(a->pool, 1024, ALIGN, &p, &err)) == NM_OK) {
        v[0] = b->api->free(b->pool, p, NULL, NULL);
        v[1] = a->api->free(a->pool, p, NULL, NULL);
    } else {
        a->api->free_message(err);
    }
    lease_release(b, lb);
    lease_release(a, la);
    return long_array(env, v, 2);
}

/* After the manager closed: every handle of the engine is stale. Returns {acquire(manager),
 * pool_stats, allocate, free(leaked pointer), reservation_try_grow(leaked reservation),
 * reservation_close(leaked reservation), spiller_unregister, detach, pool_close,
 * manager_stats(last lease), release(last lease), state drops after (still 1), spiller drops
 * after (still 1)}. */
JNIEXPORT jlongArray JNICALL Java_org_nativemem_engine_CEngine_nativeStaleProbe(JNIEnv *env,
                                                                              jclass cls,
                                                                              jlong ptr) {
    UNUSED(cls);
    engine *e = engine_of(env, ptr);
    if (e == NULL) {
        return NULL;
    }
    const nm_api *api = e->api;
    int64_t v[13];
    char *err = NULL;
    nm_lease l = 0;
    nm_pool_stats ps;
    nm_manager_stats ms;
    void *p = NULL;
    pthread_mutex_lock(&e->mu);
    void *leak_ptr = e->leak_ptr;
    nm_reservation leak_res = e->leak_res;
    nm_lease last = e->last_lease;
    pthread_mutex_unlock(&e->mu);
    v[0] = api->acquire(e->manager, &l, &err); api->free_message(err); err = NULL;
    v[1] = api->pool_stats(e->pool, &ps, &err); api->free_message(err); err = NULL;
    v[2] = api->allocate(e->pool, 64, ALIGN, &p, &err); api->free_message(err); err = NULL;
    v[3] = api->free(e->pool, leak_ptr, NULL, &err); api->free_message(err); err = NULL;
    v[4] = api->reservation_try_grow(leak_res, 1, &err); api->free_message(err); err = NULL;
    v[5] = api->reservation_close(leak_res, &err); api->free_message(err); err = NULL;
    v[6] = api->spiller_unregister(e->spiller, &err); api->free_message(err); err = NULL;
    v[7] = api->detach(e->state, 1, &err); api->free_message(err); err = NULL;
    v[8] = api->pool_close(e->pool, &err); api->free_message(err); err = NULL;
    v[9] = api->manager_stats(last, &ms, &err); api->free_message(err); err = NULL;
    v[10] = api->release(last, &err); api->free_message(err); err = NULL;
    pthread_mutex_lock(&e->mu);
    v[11] = (int64_t)e->state_dropped;
    v[12] = (int64_t)e->spiller_dropped;
    pthread_mutex_unlock(&e->mu);
    return long_array(env, v, 13);
}

