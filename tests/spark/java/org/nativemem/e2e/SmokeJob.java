package org.nativemem.e2e;

import java.util.Collections;

import org.apache.spark.TaskContext;
import org.apache.spark.api.java.function.FlatMapFunction;
import org.apache.spark.sql.SparkSession;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeReservation;
import org.nativemem.spark.TaskNativeMemory;

/**
 * The smallest nativemem job: proves that spark-submit, the e2e jar and nativemem.jar on
 * {@code --jars} work on this Spark version and master, and that every task gets a native memory
 * manager from the plugin: each task charges 1 MiB to its manager, checks the manager counts
 * exactly that, releases it, and counts its rows. Registered in tests/spark/tests.txt. Like every
 * e2e job it throws (spark-submit exits non-zero) on failure.
 */
public final class SmokeJob {
    private static final long MIB = 1L << 20;

    private SmokeJob() {}

    public static void main(String[] args) {
        long expected = args.length > 0 ? Long.parseLong(args[0]) : 1000L;
        SparkSession spark = SparkSession.builder().appName("nativemem-smoke").getOrCreate();
        try {
            FlatMapFunction<java.util.Iterator<Long>, long[]> task = rows -> {
                NativeMemoryManager m = TaskNativeMemory.get();
                long usedWhileHeld;
                try (NativeReservation r = m.newReservation("smoke", MIB)) {
                    usedWhileHeld = m.usedBytes();
                }
                long n = 0;
                while (rows.hasNext()) {
                    rows.next();
                    n++;
                }
                return Collections.singletonList(new long[] {n, usedWhileHeld, m.usedBytes(),
                        TaskContext.get().partitionId()}).iterator();
            };
            java.util.List<long[]> parts = spark.range(0, expected, 1, 4).javaRDD().mapPartitions(task).collect();
            long count = 0;
            for (long[] p : parts) {
                count += p[0];
                E2e.checkEq(MIB, p[1], "partition " + p[3] + ": manager used bytes while 1 MiB is reserved");
                E2e.checkEq(0, p[2], "partition " + p[3] + ": manager used bytes after the reservation closed");
            }
            System.out.println("SmokeJob: Spark " + spark.version() + " master " + spark.sparkContext().master()
                    + ": " + parts.size() + " tasks each charged 1 MiB to their native manager; rows " + count);
            E2e.checkEq(4, parts.size(), "tasks");
            E2e.checkEq(expected, count, "rows");
        } finally {
            spark.stop();
        }
    }
}
