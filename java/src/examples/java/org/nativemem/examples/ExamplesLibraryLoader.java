package org.nativemem.examples;

import java.io.File;
import java.io.IOException;
import java.io.InputStream;
import java.net.URL;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.StandardCopyOption;

import org.nativemem.NativeLibraryLoader;

/**
 * Loads {@code libnativemem_examples}, the native library of this package, once per JVM (per
 * class loader of this class), after nativemem's own library.
 *
 * <p>The example engine lives in its own shared library, as a real engine would: it reaches the
 * task's manager only through the engine ABI table of {@code libnativemem_jni}, whose address
 * {@link NativeSorter} passes it ({@link org.nativemem.NativeMemoryManager#nativeApi()}). So
 * nativemem's library is loaded first ({@link NativeLibraryLoader#load()}), then this one:
 * <ol>
 *   <li>from the file named by the system property {@value #LIBRARY_PATH_PROPERTY} if it is set;
 *   <li>otherwise from the classpath resource
 *       {@code org/nativemem/examples/native/<os>-<arch>/libnativemem_examples.so} (packed into
 *       {@code nativemem-examples.jar} by the build), copied to a new file in
 *       {@value NativeLibraryLoader#TMPDIR_PROPERTY} (default {@code java.io.tmpdir}), loaded,
 *       and deleted again (Linux and macOS; at JVM exit on Windows).
 * </ol>
 * The platform is named as for nativemem's library ({@link NativeLibraryLoader#platform()}). A
 * failure is remembered: every later call throws it again.
 */
final class ExamplesLibraryLoader {
    /** System property naming a library file to load instead of the packed one. */
    static final String LIBRARY_PATH_PROPERTY = "nativemem.examples.library.path";
    /** The library's base name ({@code libnativemem_examples.so} on Linux). */
    static final String LIBRARY_NAME = "nativemem_examples";

    private static final Object LOCK = new Object();
    private static volatile boolean loaded;
    /** Guarded by LOCK. */
    private static Throwable failure;

    private ExamplesLibraryLoader() {
    }

    /**
     * Loads nativemem's library and this package's, if not done yet. Cheap after the first call.
     *
     * @throws UnsatisfiedLinkError if either library cannot be found or loaded
     */
    static void load() {
        NativeLibraryLoader.load();
        if (loaded) {
            return;
        }
        synchronized (LOCK) {
            if (loaded) {
                return;
            }
            if (failure != null) {
                UnsatisfiedLinkError again = new UnsatisfiedLinkError(
                        "nativemem-examples: loading the native library failed earlier: " + failure.getMessage());
                again.initCause(failure);
                throw again;
            }
            try {
                doLoad();
                loaded = true;
            } catch (UnsatisfiedLinkError e) {
                failure = e;
                throw e;
            } catch (IOException | RuntimeException e) {
                UnsatisfiedLinkError error = new UnsatisfiedLinkError(
                        "nativemem-examples: cannot load the native library: " + e);
                error.initCause(e);
                failure = error;
                throw error;
            }
        }
    }

    /**
     * @param platform e.g. {@code linux-x86_64}
     * @return the classpath resource of the library for that platform
     */
    static String resourcePath(String platform) {
        return "org/nativemem/examples/native/" + platform + "/" + System.mapLibraryName(LIBRARY_NAME);
    }

    private static void doLoad() throws IOException {
        String override = System.getProperty(LIBRARY_PATH_PROPERTY);
        if (override != null && !override.trim().isEmpty()) {
            File file = new File(override.trim()).getAbsoluteFile();
            if (!file.isFile()) {
                throw new UnsatisfiedLinkError("nativemem-examples: -D" + LIBRARY_PATH_PROPERTY + "=" + override
                        + " is not a file (" + file + ")");
            }
            System.load(file.getPath());
            return;
        }
        String platform = NativeLibraryLoader.platform();
        String resource = resourcePath(platform);
        URL url = ExamplesLibraryLoader.class.getResource("/" + resource);
        if (url == null) {
            throw new UnsatisfiedLinkError("nativemem-examples: no native library for " + platform
                    + " on the classpath: " + resource + " is missing (put nativemem-examples.jar built for "
                    + platform + " on the classpath, or set -D" + LIBRARY_PATH_PROPERTY + "=<file>)");
        }
        String dirName = System.getProperty(NativeLibraryLoader.TMPDIR_PROPERTY, System.getProperty("java.io.tmpdir"));
        Path dir = Paths.get(dirName);
        Files.createDirectories(dir);
        String fileName = System.mapLibraryName(LIBRARY_NAME);
        int dot = fileName.lastIndexOf('.');
        // Unique per call (created exclusively, owner-only on POSIX): concurrent JVMs never share it.
        Path file = Files.createTempFile(dir, fileName.substring(0, dot) + "-", fileName.substring(dot));
        boolean loadedOk = false;
        try {
            try (InputStream in = url.openStream()) {
                Files.copy(in, file, StandardCopyOption.REPLACE_EXISTING);
            }
            System.load(file.toAbsolutePath().toString());
            loadedOk = true;
        } finally {
            if (!loadedOk || !platform.startsWith("windows")) {
                // Linux/macOS: the mapping outlives the file. Failed load: nothing to keep.
                try {
                    Files.deleteIfExists(file);
                } catch (IOException e) {
                    file.toFile().deleteOnExit();
                }
            } else {
                file.toFile().deleteOnExit();
            }
        }
    }
}
