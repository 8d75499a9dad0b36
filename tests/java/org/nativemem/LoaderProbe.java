package org.nativemem;

/**
 * Main class of the child JVMs of {@link NativeLibraryLoaderTest}: loads the library, uses it,
 * prints {@code ok <file it was loaded from>}, or {@code error <message>} and exits 1.
 */
public final class LoaderProbe {
    private LoaderProbe() {
    }

    public static void main(String[] args) {
        try {
            NativeLibraryLoader.load();
            try (NativeMemoryManager m = NativeMemoryManager.create("probe", new CountingListener());
                    NativeReservation r = m.newReservation("p", 1)) {
                // The default config: the reservation holds its 1 byte, its pool is charged one
                // whole reservation quantum (1 MiB).
                if (m.usedBytes() != NativeMemoryConfig.RECOMMENDED_RESERVATION_QUANTUM_BYTES || r.size() != 1) {
                    throw new AssertionError("used " + m.usedBytes() + ", size " + r.size());
                }
            }
            System.out.println("ok " + NativeLibraryLoader.loadedFrom());
        } catch (Throwable t) {
            System.out.println("error " + t.getMessage());
            System.exit(1);
        }
    }
}
