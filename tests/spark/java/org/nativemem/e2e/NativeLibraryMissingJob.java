package org.nativemem.e2e;

import static org.nativemem.e2e.E2e.expectThrows;

import org.apache.spark.sql.SparkSession;
import org.nativemem.NativeLibraryLoader;

/**
 * An executor that cannot load the native library fails at start with a clear message, instead
 * of failing every task later. Run on local[N] with
 * {@code spark.driver.extraJavaOptions=-Dnativemem.library.path=<missing file>} (in local mode the
 * executor is the driver's JVM): creating the session must fail with the plugin's message.
 */
public final class NativeLibraryMissingJob {
    private NativeLibraryMissingJob() {
    }

    public static void main(String[] args) {
        long start = System.nanoTime();
        String path = System.getProperty(NativeLibraryLoader.LIBRARY_PATH_PROPERTY);
        E2e.check(path != null && !new java.io.File(path).exists(),
                "-D" + NativeLibraryLoader.LIBRARY_PATH_PROPERTY + " names a missing file: " + path);
        Throwable failure = expectThrows(IllegalStateException.class,
                () -> SparkSession.builder().appName("nativemem-e2e-no-library").getOrCreate().stop(),
                "nativemem: executor driver", "cannot load the native library", path);
        System.out.printf("PASS NativeLibraryMissingJob: the executor refused to start: %s (%.1f s)%n",
                failure.getMessage().split("\n")[0], (System.nanoTime() - start) / 1e9);
    }
}
