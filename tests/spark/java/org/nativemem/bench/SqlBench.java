package org.nativemem.bench;

import java.util.Locale;

import org.apache.spark.sql.SparkSession;

/**
 * A plain Spark SQL workload (no native operator) for {@code scripts/bench.sh governor}: what
 * the container governor costs an executor that runs only JVM work. Aggregates and sorts
 * {@code --rows} generated rows; prints {@code sql job <seconds> s} (after one warm-up run).
 */
public final class SqlBench {
    private SqlBench() {
    }

    public static void main(String[] args) {
        long rows = args.length > 1 && args[0].equals("--rows") ? Long.parseLong(args[1]) : 20_000_000L;
        SparkSession spark = SparkSession.builder().appName("nativemem-bench-sql").getOrCreate();
        try {
            run(spark, rows / 10); // warm-up: class loading, code generation
            long start = System.nanoTime();
            long groups = run(spark, rows);
            double seconds = (System.nanoTime() - start) / 1e9;
            System.out.printf(Locale.ROOT, "sql job %.3f s (%d rows, %d groups)%n", seconds, rows, groups);
        } finally {
            spark.stop();
        }
    }

    private static long run(SparkSession spark, long rows) {
        return spark.range(0, rows, 1, 4)
                .selectExpr("id % 100003 AS k", "id * 7 % 1000 AS v")
                .groupBy("k").sum("v")
                .orderBy("k")
                .count();
    }
}
