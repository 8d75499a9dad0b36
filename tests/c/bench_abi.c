/*
 * bench_abi: the engine ABI timed as an engine calls it. Its own binary: it dlopen()s the
 * release library (argv[1], e.g. target/release/libnativemem_jni.so), takes the nm_api table
 * from the exported nativemem_api and includes only include/nativemem.h, as a C/C++ engine does.
 * scripts/bench.sh (part `abi`) builds and runs it and sets every figure against a baseline of the
 * same run (the core's shared grow+shrink pair, malloc+free).
 *
 * Every manager is made with manager_create_with: no listener (unlimited), the default options
 * (nm_manager_options_default(): 8 MiB blocks, the 1 MiB reservation quantum, as the core bench's
 * "quantum" rows) unless BENCH_QUANTUM says otherwise. Each thread has its own pool handle and reservation. Rows, each in three setups
 * (1 thread; 2 threads on 2 managers, i.e. two tasks; 2 threads on 1 manager, own pools and
 * reservations):
 *   pair    reservation_try_grow(64) + reservation_shrink(64)      ns per pair
 *   floor   reservation_size                                        ns per call
 *   alloc   allocate + free of 64 B, 4 KiB, 1 MiB                   ns per pair
 *   malloc  malloc + free of the same sizes (the baseline)          ns per pair
 * Threads start together (a barrier); a round's figure is the mean of the threads' time per
 * operation; the figure printed is the best of BENCH_ROUNDS (5) rounds.
 *
 * Output: "BENCH <row> <setup> <ns>" lines, setup = 1t | 2t2m | 2t1m.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nativemem.h"

static const nm_api *api;
static uint64_t quantum = NM_DEFAULT_RESERVATION_QUANTUM;
static int rounds = 5;
static uint64_t iters = 2000000;

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static void die(const char *what, nm_status status, char *err) {
    fprintf(stderr, "bench_abi: %s failed (status %d): %s\n", what, (int)status, err ? err : "");
    if (err) api->free_message(err);
    exit(1);
}

#define CHECK(what, call)                          \
    do {                                           \
        char *err_ = NULL;                         \
        nm_status st_ = (call);                    \
        if (st_ != NM_OK) die(what, st_, err_);    \
    } while (0)
/* The calls below pass &err_ through this macro's scope. */
#define E (&err_)

/* Keeps the compiler from dropping or merging what it cannot see used. */
static inline void sink(void *p) { __asm__ volatile("" : : "r"(p) : "memory"); }

typedef enum { OP_PAIR, OP_FLOOR, OP_ALLOC, OP_MALLOC } op_kind;

typedef struct {
    op_kind op;
    uint64_t size;
    nm_pool pool;
    nm_reservation r;
    pthread_barrier_t *start;
    double ns_per_op;
} worker;

static void *run_worker(void *arg) {
    worker *w = arg;
    uint64_t n = iters;
    if (w->op == OP_ALLOC || w->op == OP_MALLOC) n = w->size >= (1u << 20) ? iters / 8 : iters / 2;
    pthread_barrier_wait(w->start);
    double t0 = now_ns();
    switch (w->op) {
    case OP_PAIR:
        for (uint64_t i = 0; i < n; i++) {
            if (api->reservation_try_grow(w->r, 64, NULL) != NM_OK) die("try_grow", 1, NULL);
            if (api->reservation_shrink(w->r, 64, NULL) != NM_OK) die("shrink", 1, NULL);
        }
        break;
    case OP_FLOOR: {
        uint64_t size = 0;
        for (uint64_t i = 0; i < n; i++) {
            if (api->reservation_size(w->r, &size, NULL) != NM_OK) die("reservation_size", 1, NULL);
            sink(&size);
        }
        break;
    }
    case OP_ALLOC:
        for (uint64_t i = 0; i < n; i++) {
            void *p = NULL;
            if (api->allocate(w->pool, w->size, 0, &p, NULL) != NM_OK) die("allocate", 1, NULL);
            sink(p);
            if (api->free(w->pool, p, NULL, NULL) != NM_OK) die("free", 1, NULL);
        }
        break;
    case OP_MALLOC:
        for (uint64_t i = 0; i < n; i++) {
            void *p = malloc(w->size);
            if (!p) die("malloc", 1, NULL);
            sink(p);
            free(p);
        }
        break;
    }
    w->ns_per_op = (now_ns() - t0) / (double)n;
    return NULL;
}

typedef struct {
    nm_manager manager;
    nm_lease lease;
} task;

static task new_task(const char *name) {
    task t;
    nm_manager_options o = nm_manager_options_default();
    o.reservation_quantum = quantum;
    CHECK("manager_create_with", api->manager_create_with(name, &o, NULL, &t.manager, E));
    CHECK("acquire", api->acquire(t.manager, &t.lease, E));
    return t;
}

static void close_task(task t) {
    CHECK("release", api->release(t.lease, E));
    uint64_t leaked = 0;
    CHECK("manager_close", api->manager_close(t.manager, NULL, &leaked, E));
    if (leaked != 0) {
        fprintf(stderr, "bench_abi: %llu bytes leaked\n", (unsigned long long)leaked);
        exit(1);
    }
}

/* One measurement: `threads` workers doing `op`, on `managers` managers (1 or threads). Returns
 * the best over `rounds` of the mean of the threads' ns per operation. */
static double measure(op_kind op, uint64_t size, int threads, int managers) {
    task tasks[2];
    worker ws[2];
    char name[64];
    for (int m = 0; m < managers; m++) {
        snprintf(name, sizeof name, "bench-%d", m);
        tasks[m] = new_task(name);
    }
    for (int i = 0; i < threads; i++) {
        task *t = &tasks[managers == 1 ? 0 : i];
        memset(&ws[i], 0, sizeof ws[i]);
        ws[i].op = op;
        ws[i].size = size;
        if (op != OP_MALLOC) {
            snprintf(name, sizeof name, "bench/t%d", i);
            CHECK("pool_open", api->pool_open(t->lease, name, -1, &ws[i].pool, E));
            CHECK("reservation_new", api->reservation_new(ws[i].pool, "bench", &ws[i].r, E));
            /* Charged once: the pairs below run on the quantum's slack (as the core bench). */
            CHECK("try_grow", api->reservation_try_grow(ws[i].r, 1024, E));
            CHECK("shrink", api->reservation_shrink(ws[i].r, 1024, E));
        }
    }
    double best = 1e300;
    for (int round = 0; round < rounds; round++) {
        pthread_barrier_t start;
        pthread_barrier_init(&start, NULL, (unsigned)threads);
        pthread_t tids[2];
        for (int i = 0; i < threads; i++) {
            ws[i].start = &start;
            pthread_create(&tids[i], NULL, run_worker, &ws[i]);
        }
        double sum = 0;
        for (int i = 0; i < threads; i++) {
            pthread_join(tids[i], NULL);
            sum += ws[i].ns_per_op;
        }
        pthread_barrier_destroy(&start);
        double mean = sum / threads;
        if (mean < best) best = mean;
    }
    for (int i = 0; i < threads; i++) {
        if (op != OP_MALLOC) {
            CHECK("reservation_close", api->reservation_close(ws[i].r, E));
            CHECK("pool_close", api->pool_close(ws[i].pool, E));
        }
    }
    for (int m = 0; m < managers; m++) close_task(tasks[m]);
    return best;
}

static void row(const char *name, op_kind op, uint64_t size) {
    static const struct { const char *label; int threads, managers; } setups[] = {
        {"1t", 1, 1}, {"2t2m", 2, 2}, {"2t1m", 2, 1}};
    for (size_t s = 0; s < sizeof setups / sizeof setups[0]; s++) {
        double ns = measure(op, size, setups[s].threads, setups[s].managers);
        printf("BENCH %s %s %.2f\n", name, setups[s].label, ns);
        fflush(stdout);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bench_abi <path to libnativemem_jni.so>\n");
        return 2;
    }
    const char *q = getenv("BENCH_QUANTUM");
    if (q) quantum = strtoull(q, NULL, 10);
    const char *r = getenv("BENCH_ROUNDS");
    if (r) rounds = atoi(r) > 0 ? atoi(r) : rounds;
    const char *it = getenv("BENCH_ITERS");
    if (it) iters = strtoull(it, NULL, 10) > 0 ? strtoull(it, NULL, 10) : iters;
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "bench_abi: dlopen: %s\n", dlerror());
        return 1;
    }
    const nm_api *(*get)(uint32_t) = (const nm_api *(*)(uint32_t))dlsym(lib, "nativemem_api");
    if (!get) {
        fprintf(stderr, "bench_abi: no nativemem_api in %s\n", argv[1]);
        return 1;
    }
    api = get(NM_ABI_VERSION);
    if (nm_api_check(api) != NM_OK) {
        fprintf(stderr, "bench_abi: the library's table is older than this header\n");
        return 1;
    }
    printf("BENCH config quantum %llu rounds %d iters %llu\n", (unsigned long long)quantum, rounds,
           (unsigned long long)iters);
    row("pair", OP_PAIR, 64);
    row("floor", OP_FLOOR, 0);
    static const uint64_t sizes[] = {64, 4096, 1u << 20};
    for (size_t i = 0; i < 3; i++) {
        char name[32];
        snprintf(name, sizeof name, "alloc_%llu", (unsigned long long)sizes[i]);
        row(name, OP_ALLOC, sizes[i]);
        snprintf(name, sizeof name, "malloc_%llu", (unsigned long long)sizes[i]);
        row(name, OP_MALLOC, sizes[i]);
    }
    return 0;
}
