package org.nativemem.examples;

import org.nativemem.EngineLibrary;

/**
 * Loads {@code libnativemem_examples}, the native library of this package, once per JVM, after
 * nativemem's own library.
 *
 * <p>The example engine lives in its own shared library, as a real engine would: it reaches the
 * task's manager only through the engine ABI table of {@code libnativemem_jni}, whose address
 * {@link NativeSorter} passes it ({@link org.nativemem.NativeMemoryManager#nativeApi()}). It is
 * loaded the way any engine can load its own: with {@link EngineLibrary}, from the file named by
 * {@value #LIBRARY_PATH_PROPERTY} if set, else from
 * {@code org/nativemem/examples/native/<os>-<arch>/libnativemem_examples.so} in
 * {@code nativemem-examples.jar}.
 */
final class ExamplesLibraryLoader {
    /** System property naming a library file to load instead of the packed one. */
    static final String LIBRARY_PATH_PROPERTY = "nativemem.examples.library.path";

    private static final EngineLibrary LIBRARY = new EngineLibrary(ExamplesLibraryLoader.class,
            "nativemem_examples", "org/nativemem/examples/native", LIBRARY_PATH_PROPERTY);

    private ExamplesLibraryLoader() {
    }

    /**
     * Loads nativemem's library and this package's, if not done yet. Cheap after the first call.
     *
     * @throws UnsatisfiedLinkError if either library cannot be found or loaded
     */
    static void load() {
        LIBRARY.load();
    }
}
