package org.nativemem;

import java.io.File;
import java.io.IOException;
import java.io.InputStream;
import java.net.URL;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.StandardCopyOption;
import java.util.Locale;

/**
 * Loads the native library {@code nativemem_jni} once per JVM (per class loader of this class).
 *
 * <h2>Where from</h2>
 * <ol>
 *   <li>If the system property {@value #LIBRARY_PATH_PROPERTY} is set, that file is loaded
 *       (for development: {@code -Dnativemem.library.path=target/release/libnativemem_jni.so}).
 *   <li>Otherwise the library for the running platform is read from the classpath at
 *       {@code org/nativemem/native/<os>-<arch>/<System.mapLibraryName("nativemem_jni")>}, e.g.
 *       {@code org/nativemem/native/linux-x86_64/libnativemem_jni.so} (packed into the jar by
 *       the build), copied to a new file in {@value #TMPDIR_PROPERTY} (default
 *       {@code java.io.tmpdir}) and loaded from there.
 * </ol>
 * Platforms are named {@code linux}, {@code macos} or {@code windows} and {@code x86_64} or
 * {@code aarch64}; any other {@code os.name}/{@code os.arch} fails loudly instead of guessing.
 *
 * <h2>Concurrency</h2>
 * Threads of one JVM: the first caller loads under a lock, later callers return at once (or
 * get the first failure again). Several JVMs on one host (Spark executors): each extracts to its
 * own uniquely named file ({@link Files#createTempFile}, created exclusively), so no JVM ever
 * reads a file another is writing. On Linux and macOS the file is deleted right after loading
 * (the loaded mapping stays valid), so crashed or killed executors leave nothing in the temp
 * directory; on Windows it is deleted at JVM exit.
 *
 * <h2>Checks</h2>
 * After loading, the library's ABI version is compared with the one these classes were built
 * for, so a stale library fails at load instead of at the first native call.
 */
public final class NativeLibraryLoader {
    /** System property naming a library file to load instead of the packed one. */
    public static final String LIBRARY_PATH_PROPERTY = "nativemem.library.path";
    /** System property naming the directory to extract the packed library to. */
    public static final String TMPDIR_PROPERTY = "nativemem.tmpdir";
    /** The library's base name ({@code libnativemem_jni.so} on Linux). */
    public static final String LIBRARY_NAME = "nativemem_jni";
    /** Version of the native interface these classes expect (see the Rust crate's ABI_VERSION). */
    static final int ABI_VERSION = 2;

    private static final Object LOCK = new Object();
    private static volatile boolean loaded;
    /** Guarded by LOCK. */
    private static Throwable failure;
    private static volatile String loadedFrom;

    private NativeLibraryLoader() {
    }

    /**
     * Loads the library if this has not happened yet. Cheap after the first call.
     *
     * @throws UnsatisfiedLinkError if the platform is not supported, no library is packed for it,
     *     extraction or loading fails, or the library does not match these classes; every later
     *     call throws the same error again (a new instance with the first one as cause)
     */
    public static void load() {
        if (loaded) {
            return;
        }
        synchronized (LOCK) {
            if (loaded) {
                return;
            }
            if (failure != null) {
                UnsatisfiedLinkError again = new UnsatisfiedLinkError(
                        "nativemem: loading the native library failed earlier: " + failure.getMessage());
                again.initCause(failure);
                throw again;
            }
            try {
                loadedFrom = doLoad();
                loaded = true;
            } catch (UnsatisfiedLinkError e) {
                failure = e;
                throw e;
            } catch (IOException | RuntimeException e) {
                UnsatisfiedLinkError error = new UnsatisfiedLinkError(
                        "nativemem: cannot load the native library: " + e);
                error.initCause(e);
                failure = error;
                throw error;
            }
        }
    }

    /** @return true once {@link #load()} succeeded */
    public static boolean isLoaded() {
        return loaded;
    }

    /**
     * @return the file the library was loaded from (the override, or the extracted copy, which
     *     may be deleted already), or null if it is not loaded
     */
    public static String loadedFrom() {
        return loadedFrom;
    }

    /**
     * @return the running platform as packed in the jar, e.g. {@code linux-x86_64}
     * @throws UnsatisfiedLinkError if the operating system or architecture is not supported
     */
    public static String platform() {
        return platform(System.getProperty("os.name", ""), System.getProperty("os.arch", ""));
    }

    /**
     * @param osName a value of {@code os.name}
     * @param osArch a value of {@code os.arch}
     * @return the platform name, e.g. {@code linux-aarch64}
     * @throws UnsatisfiedLinkError if either is not supported
     */
    static String platform(String osName, String osArch) {
        String os = osName.toLowerCase(Locale.ROOT);
        String osPart;
        if (os.startsWith("linux")) {
            osPart = "linux";
        } else if (os.startsWith("mac") || os.startsWith("darwin")) {
            osPart = "macos";
        } else if (os.startsWith("windows")) {
            osPart = "windows";
        } else {
            throw new UnsatisfiedLinkError("nativemem: unsupported operating system os.name=" + osName
                    + " (supported: Linux, macOS, Windows); set -D" + LIBRARY_PATH_PROPERTY + "=<file> to load a library built for it");
        }
        String arch = osArch.toLowerCase(Locale.ROOT);
        String archPart;
        if (arch.equals("amd64") || arch.equals("x86_64") || arch.equals("x86-64")) {
            archPart = "x86_64";
        } else if (arch.equals("aarch64") || arch.equals("arm64")) {
            archPart = "aarch64";
        } else {
            throw new UnsatisfiedLinkError("nativemem: unsupported architecture os.arch=" + osArch + " on " + osPart
                    + " (supported: x86_64, aarch64); set -D" + LIBRARY_PATH_PROPERTY + "=<file> to load a library built for it");
        }
        return osPart + "-" + archPart;
    }

    /**
     * @param platform e.g. {@code linux-x86_64}
     * @return the classpath resource of the library for that platform
     */
    static String resourcePath(String platform) {
        return "org/nativemem/native/" + platform + "/" + System.mapLibraryName(LIBRARY_NAME);
    }

    private static String doLoad() throws IOException {
        String override = System.getProperty(LIBRARY_PATH_PROPERTY);
        String path;
        if (override != null && !override.trim().isEmpty()) {
            File file = new File(override.trim()).getAbsoluteFile();
            if (!file.isFile()) {
                throw new UnsatisfiedLinkError("nativemem: -D" + LIBRARY_PATH_PROPERTY + "=" + override
                        + " is not a file (" + file + ")");
            }
            path = file.getPath();
            System.load(path);
        } else {
            path = extractAndLoad(platform());
        }
        checkAbi(path);
        return path;
    }

    private static String extractAndLoad(String platform) throws IOException {
        String resource = resourcePath(platform);
        URL url = NativeLibraryLoader.class.getResource("/" + resource);
        if (url == null) {
            throw new UnsatisfiedLinkError("nativemem: no native library for " + platform + " (os.name="
                    + System.getProperty("os.name") + ", os.arch=" + System.getProperty("os.arch")
                    + ") on the classpath: " + resource + " is missing from the jar; use a nativemem jar built for "
                    + platform + " or set -D" + LIBRARY_PATH_PROPERTY + "=<file>");
        }
        return extractAndLoad(url, LIBRARY_NAME, platform);
    }

    /**
     * Copies the library at {@code url} to a new file in {@value #TMPDIR_PROPERTY} (default
     * {@code java.io.tmpdir}), loads it and deletes the file again (Linux and macOS: the mapping
     * outlives the file; Windows: at JVM exit). Shared with {@link EngineLibrary}.
     *
     * @return the path of the loaded copy
     */
    static String extractAndLoad(URL url, String libraryName, String platform) throws IOException {
        String dirName = System.getProperty(TMPDIR_PROPERTY, System.getProperty("java.io.tmpdir"));
        Path dir = Paths.get(dirName);
        Files.createDirectories(dir);
        String fileName = System.mapLibraryName(libraryName);
        int dot = fileName.lastIndexOf('.');
        // Unique per call: createTempFile creates the file exclusively (CREATE_NEW) with a random
        // name, so concurrent JVMs never share a file; owner-only permissions on POSIX.
        Path file = Files.createTempFile(dir, fileName.substring(0, dot) + "-", fileName.substring(dot));
        boolean loadedOk = false;
        try {
            try (InputStream in = url.openStream()) {
                Files.copy(in, file, StandardCopyOption.REPLACE_EXISTING);
            }
            System.load(file.toAbsolutePath().toString());
            loadedOk = true;
        } finally {
            boolean windows = platform.startsWith("windows");
            if (!loadedOk || !windows) {
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
        return file.toAbsolutePath().toString();
    }

    private static void checkAbi(String path) {
        int version;
        try {
            version = nativeAbiVersion();
        } catch (UnsatisfiedLinkError e) {
            UnsatisfiedLinkError error = new UnsatisfiedLinkError("nativemem: " + path
                    + " is not a nativemem library of this version (no ABI version function)");
            error.initCause(e);
            throw error;
        }
        if (version != ABI_VERSION) {
            throw new UnsatisfiedLinkError("nativemem: " + path + " has ABI version " + version
                    + " but these classes need " + ABI_VERSION + "; rebuild the library or the jar so they match");
        }
    }

    private static native int nativeAbiVersion();
}
