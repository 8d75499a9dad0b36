package org.nativemem;

import java.io.File;
import java.io.IOException;
import java.net.URL;

/**
 * Loads a native engine's own shared library (one that uses nativemem through the engine ABI,
 * {@code include/nativemem.h}) once per JVM, after nativemem's: ship it in your jar next to your
 * classes, as nativemem ships its own.
 *
 * <pre>{@code
 * private static final EngineLibrary LIBRARY = new EngineLibrary(MyEngine.class, "myengine",
 *         "com/example/myengine/native", "myengine.library.path");
 * ...
 * LIBRARY.load();   // nativemem's library, then native/<os>-<arch>/libmyengine.so from the jar
 * long api = NativeMemoryManager.nativeApi();
 * }</pre>
 *
 * The library is loaded from the file named by the system property {@code overrideProperty} if it
 * is set, else from the classpath resource {@code <resourceDir>/<os>-<arch>/<mapped name>} (the
 * platform as {@link NativeLibraryLoader#platform()} names it), copied to a new file in
 * {@value NativeLibraryLoader#TMPDIR_PROPERTY}, loaded, and deleted again. A failure is
 * remembered: every later {@link #load()} throws it again. Thread-safe.
 */
public final class EngineLibrary {
    private final Class<?> anchor;
    private final String libraryName;
    private final String resourceDir;
    private final String overrideProperty;
    private final Object lock = new Object();
    private volatile String loadedFrom;
    /** Guarded by lock. */
    private Throwable failure;

    /**
     * @param anchor a class of the jar that carries the library (its class loader finds it)
     * @param libraryName the base name, e.g. {@code myengine} for {@code libmyengine.so}
     * @param resourceDir the resource folder holding {@code <os>-<arch>/}, without leading slash
     * @param overrideProperty the system property that names a library file to load instead
     */
    public EngineLibrary(Class<?> anchor, String libraryName, String resourceDir, String overrideProperty) {
        if (anchor == null || libraryName == null || resourceDir == null || overrideProperty == null) {
            throw new NullPointerException("EngineLibrary: no argument may be null");
        }
        this.anchor = anchor;
        this.libraryName = libraryName;
        this.resourceDir = resourceDir.endsWith("/") ? resourceDir.substring(0, resourceDir.length() - 1) : resourceDir;
        this.overrideProperty = overrideProperty;
    }

    /**
     * Loads nativemem's library and this one, if not done yet. Cheap after the first call.
     *
     * @throws UnsatisfiedLinkError if either library cannot be found or loaded (again on every
     *     later call, with the first failure as cause)
     */
    public void load() {
        NativeLibraryLoader.load();
        if (loadedFrom != null) {
            return;
        }
        synchronized (lock) {
            if (loadedFrom != null) {
                return;
            }
            if (failure != null) {
                UnsatisfiedLinkError again = new UnsatisfiedLinkError(
                        libraryName + ": loading the native library failed earlier: " + failure.getMessage());
                again.initCause(failure);
                throw again;
            }
            try {
                loadedFrom = doLoad();
            } catch (UnsatisfiedLinkError e) {
                failure = e;
                throw e;
            } catch (IOException | RuntimeException e) {
                UnsatisfiedLinkError error = new UnsatisfiedLinkError(
                        libraryName + ": cannot load the native library: " + e);
                error.initCause(e);
                failure = error;
                throw error;
            }
        }
    }

    /** @return the file the library was loaded from, or null if it is not loaded */
    public String loadedFrom() {
        return loadedFrom;
    }

    /**
     * @param platform e.g. {@code linux-x86_64}
     * @return the classpath resource of the library for that platform
     */
    public String resourcePath(String platform) {
        return resourceDir + "/" + platform + "/" + System.mapLibraryName(libraryName);
    }

    private String doLoad() throws IOException {
        String override = System.getProperty(overrideProperty);
        if (override != null && !override.trim().isEmpty()) {
            File file = new File(override.trim()).getAbsoluteFile();
            if (!file.isFile()) {
                throw new UnsatisfiedLinkError(libraryName + ": -D" + overrideProperty + "=" + override
                        + " is not a file (" + file + ")");
            }
            System.load(file.getPath());
            return file.getPath();
        }
        String platform = NativeLibraryLoader.platform();
        String resource = resourcePath(platform);
        URL url = anchor.getResource("/" + resource);
        if (url == null) {
            throw new UnsatisfiedLinkError(libraryName + ": no native library for " + platform
                    + " on the classpath: " + resource + " is missing (put the jar built for " + platform
                    + " on the classpath, or set -D" + overrideProperty + "=<file>)");
        }
        return NativeLibraryLoader.extractAndLoad(url, libraryName, platform);
    }
}
