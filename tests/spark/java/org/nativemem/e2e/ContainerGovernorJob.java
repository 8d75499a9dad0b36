package org.nativemem.e2e;

import static org.nativemem.e2e.E2e.MiB;
import static org.nativemem.e2e.E2e.check;
import static org.nativemem.e2e.E2e.checkEq;

import java.io.FileInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.Arrays;
import java.util.Collections;
import java.util.List;
import java.util.Locale;

import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.sql.SparkSession;
import org.nativemem.ContainerGovernor;
import org.nativemem.NativeMemoryManager;
import org.nativemem.engine.CEngine;
import org.nativemem.spark.TaskNativeMemory;

/**
 * The container governor against a real kernel memory cgroup and its OOM killer
 * ({@code tests/spark/container-governor.sh} creates the cgroup, runs this job twice and removes
 * it). One executor (local-cluster) is moved into the cgroup, whose limit is far below what
 * Spark lets native memory use (a misconfigured {@code spark.memory.offHeap.size}); each task
 * holds untracked memory counted by forced charges (the C engine's malloc hook) and grows a C
 * engine's spillable buffers well past the limit, at a steady pace.
 *
 * <ul>
 *   <li>{@code --expect oom} (governor off): the kernel kills the executor: the cgroup's
 *       {@code oom_kill} counter rises and the job fails with the executor lost.
 *   <li>{@code --expect success} (governor on): reading a file larger than the cgroup's limit
 *       (page cache) triggers no pressure; the job completes with the expected results, no OOM
 *       kill, and the governor's actions (spills, refusals) and its relief time are printed.
 * </ul>
 *
 * Arguments: {@code --cgroup <dir> --limit <bytes> --expect oom|success [--page-cache-file <path>]}.
 */
public final class ContainerGovernorJob {
    static final String PREFIX = "ContainerGovernorJob";
    static final int TASKS = 2;
    /** Untracked memory per task, half plain malloc and half through the forced-charge hook. */
    static final long UNTRACKED = 96 * MiB;
    /** Spillable buffers each task allocates in all (kept unless spilled). */
    static final long GROWTH = 1536 * MiB;
    static final long BUFFER = 8 * MiB;
    /** Pause between buffers: ~800 MB/s of growth. */
    static final long PAUSE_MILLIS = 10;

    private ContainerGovernorJob() {
    }

    public static void main(String[] args) throws Exception {
        String cgroup = null;
        String expect = null;
        String pageCacheFile = null;
        long limit = -1;
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "--cgroup":
                    cgroup = args[++i];
                    break;
                case "--limit":
                    limit = Long.parseLong(args[++i]);
                    break;
                case "--expect":
                    expect = args[++i];
                    break;
                case "--page-cache-file":
                    pageCacheFile = args[++i];
                    break;
                default:
                    throw new IllegalArgumentException("unknown argument " + args[i]);
            }
        }
        check(cgroup != null && limit > 0 && ("oom".equals(expect) || "success".equals(expect)),
                "usage: --cgroup <dir> --limit <bytes> --expect oom|success");
        final long limitBytes = limit;
        long start = System.nanoTime();
        SparkSession spark = SparkSession.builder().appName("nativemem-e2e-container").getOrCreate();
        try {
            JavaSparkContext jsc = JavaSparkContext.fromSparkContext(spark.sparkContext());
            // 1. The executor into the cgroup.
            List<Long> pids = jsc.parallelize(Arrays.asList(0, 1, 2, 3), 4)
                    .map(i -> pid()).distinct().collect();
            checkEq(1, pids.size(), "one executor: " + pids);
            long pid = pids.get(0);
            check(pid != pid(), "the executor is not the driver (local-cluster)");
            Files.write(Paths.get(cgroup, "cgroup.procs"), String.valueOf(pid).getBytes(StandardCharsets.US_ASCII));
            String membership = new String(Files.readAllBytes(Paths.get("/proc/" + pid + "/cgroup")),
                    StandardCharsets.US_ASCII);
            check(membership.contains(Paths.get(cgroup).getFileName().toString()),
                    "executor " + pid + " moved into " + cgroup + ": " + membership);
            long killsBefore = oomKills(cgroup);
            System.out.printf(Locale.ROOT, "%s: executor pid %d in %s (limit %d MiB), OOM kills %d%n", PREFIX, pid,
                    cgroup, limitBytes / MiB, killsBefore);

            if (expect.equals("oom")) {
                long[][] status = governorStatus(jsc);
                checkEq(0, status[0][0], "no governor runs (spark.nativemem.governor.enabled=false)");
                Throwable failure = null;
                try {
                    jsc.parallelize(Arrays.asList(0, 1), TASKS).map(i -> workload()).collect();
                } catch (Exception e) {
                    failure = e;
                }
                long kills = oomKills(cgroup);
                check(failure != null, "without the governor the job fails");
                check(kills > killsBefore, "the kernel killed in the cgroup: oom_kill " + killsBefore + " -> " + kills);
                System.out.printf(Locale.ROOT, "PASS %s (governor off): the kernel OOM-killed the executor (oom_kill %d"
                        + " -> %d) and the job failed: %s (%.1f s)%n", PREFIX, killsBefore, kills,
                        firstLine(failure), (System.nanoTime() - start) / 1e9);
                return;
            }

            // 2. The governor follows the move and reads the cgroup's limit.
            long deadline = System.nanoTime() + 10_000_000_000L;
            long[] g = governorStatus(jsc)[0];
            while (g[1] != limitBytes && System.nanoTime() < deadline) {
                Thread.sleep(200);
                g = governorStatus(jsc)[0];
            }
            checkEq(limitBytes, g[1], "the executor's governor reads the cgroup's limit");

            // 3. Page cache is not usage: reading a file larger than the limit causes no pressure.
            if (pageCacheFile != null) {
                final String file = pageCacheFile;
                long read = jsc.parallelize(Collections.singletonList(0), 1).map(i -> readAll(file)).collect().get(0);
                check(read > limitBytes, "the file (" + read + " bytes) is larger than the limit");
                long[] after = governorStatus(jsc)[0];
                checkEq(0, after[3], "no soft-pressure episode from page cache: " + Arrays.toString(after));
                System.out.printf(Locale.ROOT, "%s: read %d MiB through the page cache: no pressure action%n", PREFIX,
                        read / MiB);
            }

            // 4. The workload completes.
            List<Long> results = jsc.parallelize(Arrays.asList(0, 1), TASKS).map(i -> workload()).collect();
            long kills = oomKills(cgroup);
            checkEq(killsBefore, kills, "no OOM kill with the governor");
            for (long r : results) {
                checkEq(GROWTH, r, "each task allocated all its buffers");
            }
            long[] end = governorStatus(jsc)[0];
            check(end[5] > 0 && end[6] > 0, "the governor spilled the engines: " + Arrays.toString(end));
            System.out.printf(Locale.ROOT, "PASS %s (governor on): %d tasks each grew %d MiB of spillable native buffers"
                    + " beside %d MiB untracked under a %d MiB cgroup: no OOM kill (oom_kill %d); governor: %d soft /"
                    + " %d hard episodes, %d spill rounds freed %d MiB, %d grows refused, longest relief %.0f ms,"
                    + " %d samples at %.1f us each (%.1f s)%n", PREFIX, TASKS, GROWTH / MiB, UNTRACKED / MiB,
                    limitBytes / MiB, kills, end[3], end[4], end[5], end[6] / MiB, end[7], end[8] / 1e6, end[9],
                    end[9] == 0 ? 0 : end[10] / 1e3 / end[9], (System.nanoTime() - start) / 1e9);
        } finally {
            spark.stop();
        }
    }

    /**
     * Runs in the task: untracked memory with forced charges, then spillable C buffers grown at a
     * steady pace; frees everything. Returns the bytes of buffers allocated.
     */
    static long workload() throws InterruptedException {
        NativeMemoryManager mm = TaskNativeMemory.get();
        long untracked = CEngine.openUntracked(mm, UNTRACKED / 2, UNTRACKED / 2);
        CEngine engine = CEngine.open(mm, "container/buffers", -1);
        long allocated = 0;
        try {
            while (allocated < GROWTH) {
                long[] done = engine.allocate(1, BUFFER, 0);
                allocated += done[1];
                Thread.sleep(PAUSE_MILLIS);
            }
        } finally {
            engine.close();
            CEngine.closeUntracked(untracked);
        }
        return allocated;
    }

    /** Reads the whole file, returns its size. */
    static long readAll(String file) throws IOException {
        byte[] buf = new byte[1 << 20];
        long total = 0;
        try (InputStream in = new FileInputStream(file)) {
            int n;
            while ((n = in.read(buf)) > 0) {
                total += n;
            }
        }
        return total;
    }

    /**
     * The executor's governor, from a task: {running, limit, pressure, soft entries, hard entries,
     * spill rounds, spilled bytes, refused grows, longest relief ns, samples, sample ns}.
     */
    static long[][] governorStatus(JavaSparkContext jsc) {
        List<long[]> all = jsc.parallelize(Collections.singletonList(0), 1).map(i -> {
            ContainerGovernor.Status s = ContainerGovernor.status();
            return new long[] {s.running() ? 1 : 0, s.limitBytes(), s.pressure(), s.softEntries(), s.hardEntries(),
                s.spills(), s.spilledBytes(), s.refusedGrows(), s.maxReliefNanos(), s.samples(), s.sampleNanos()};
        }).collect();
        return all.toArray(new long[0][]);
    }

    /** This JVM's process id (Java 8 API: through /proc). */
    static long pid() throws IOException {
        return Long.parseLong(Files.readSymbolicLink(Paths.get("/proc/self")).toString());
    }

    /** The cgroup's OOM kills (v2 memory.events, v1 memory.oom_control). */
    static long oomKills(String cgroup) throws IOException {
        Path events = Paths.get(cgroup, "memory.events");
        Path control = Paths.get(cgroup, "memory.oom_control");
        Path file = Files.exists(events) ? events : control;
        for (String line : Files.readAllLines(file, StandardCharsets.US_ASCII)) {
            String[] kv = line.trim().split("\\s+");
            if (kv.length == 2 && kv[0].equals("oom_kill")) {
                return Long.parseLong(kv[1]);
            }
        }
        throw new IllegalStateException("no oom_kill in " + file);
    }

    private static String firstLine(Throwable t) {
        String m = String.valueOf(t.getMessage());
        int nl = m.indexOf('\n');
        return nl < 0 ? m : m.substring(0, nl);
    }
}
