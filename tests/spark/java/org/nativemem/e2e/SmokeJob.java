package org.nativemem.e2e;

import org.apache.spark.sql.SparkSession;

/**
 * The smallest Spark job: proves that spark-submit, the e2e jar and nativemem.jar on {@code --jars}
 * work on this Spark version and master. Registered in tests/spark/tests.txt; run by
 * scripts/run-example.sh. Like every e2e job it throws (spark-submit exits non-zero) on failure.
 */
public final class SmokeJob {
    private SmokeJob() {}

    public static void main(String[] args) {
        long expected = args.length > 0 ? Long.parseLong(args[0]) : 1000L;
        SparkSession spark = SparkSession.builder().appName("nativemem-smoke").getOrCreate();
        try {
            long count = spark.range(expected).count();
            System.out.println("SmokeJob: Spark " + spark.version() + " master "
                    + spark.sparkContext().master() + ": spark.range(" + expected + ").count() = " + count);
            if (count != expected) {
                throw new AssertionError("SmokeJob: expected " + expected + " rows, got " + count);
            }
        } finally {
            spark.stop();
        }
    }
}
