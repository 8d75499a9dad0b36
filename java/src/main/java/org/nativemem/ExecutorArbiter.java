package org.nativemem;

/**
 * Executor-wide arbitration between the task managers of one executor (one process).
 *
 * <p>Spark gives each of N running tasks between 1/2N and 1/N of execution memory and spills
 * only consumers of the requesting task. A native manager holds memory from Spark ahead of use
 * (its <i>cushion</i>: whole reservation blocks) and, with a reservation quantum, <i>slack</i>:
 * memory Spark counts as used by a task that no native operator holds. When Spark grants a task's
 * native grow less than it needs (after its own cushion and slack, and after Spark spilled that
 * task's own consumers), the executor's other task managers hand their idle cushion and slack back
 * to Spark, and the grow asks Spark once more, before it spills its own native operators or fails.
 * The memory goes back to Spark's pool, so Spark's own fairness decides who gets it.
 *
 * <h2>Whom it asks</h2>
 * Every other live manager, those whose native operators hold nothing first (a task finished with
 * its native work or not yet started), then the most idle first; each only for what is still short.
 * A manager being closed is skipped, never waited for; so is one whose own request to Spark is in
 * flight (it is short itself). A grow made while Spark asks a task for memory back (inside
 * {@code spill}) never arbitrates. Handing memory back calls the giving task's listener from the
 * short task's thread; the Spark listener releases without the giving task's
 * {@code TaskMemoryManager} monitor, so a thread of that task waiting inside Spark never blocks it
 * ({@code org.nativemem.spark.SparkReservationListener}, "Threads and locks").
 *
 * <h2>Cross-task spill (off by default)</h2>
 * When idle memory is not enough, the largest other task's native spillers may be asked to spill
 * for the requester, at most a cap per request; the executor log names the task that paid. The
 * trade-off: a task that is not short pays with its own spill (and disk I/O) so that another one
 * avoids spilling or failing, and the victim's spillers run on the requester's thread.
 *
 * <p>The Spark plugin configures it at executor start from {@code spark.nativemem.arbitration.*}.
 * Thread safety: all methods may be called from any thread.
 */
public final class ExecutorArbiter {
    private ExecutorArbiter() {
    }

    /**
     * Sets arbitration's settings for every manager of the process (from the next short grant on).
     *
     * @param enabled other tasks hand idle memory back on a short grant
     * @param crossTaskSpill the largest other task spills for a short task when idle memory is not enough
     * @param spillCapBytes the most bytes a cross-task spill frees per request, {@code >= 0}
     * @throws IllegalArgumentException if {@code spillCapBytes} is negative
     */
    public static void configure(boolean enabled, boolean crossTaskSpill, long spillCapBytes) {
        NativeLibraryLoader.load();
        nativeConfigure(enabled, crossTaskSpill, spillCapBytes);
    }

    /** @return the settings and figures now */
    public static Status status() {
        NativeLibraryLoader.load();
        return new Status(nativeStatus());
    }

    /** Arbitration's settings and figures, executor-wide. Immutable. */
    public static final class Status {
        private final long[] v;

        Status(long[] values) {
            this.v = values.clone();
        }

        /** @return whether arbitration is on */
        public boolean enabled() {
            return v[0] != 0;
        }

        /** @return whether cross-task spill is on */
        public boolean crossTaskSpill() {
            return v[1] != 0;
        }

        /** @return the most bytes a cross-task spill frees per request */
        public long spillCapBytes() {
            return v[2];
        }

        /** @return idle bytes held across the executor now: cushion + slack of every live manager */
        public long idleBytes() {
            return v[3];
        }

        /** @return short grants from Spark the arbiter was asked about */
        public long shortGrants() {
            return v[4];
        }

        /** @return short grants other tasks' idle memory helped (cross-task reclaims) */
        public long reclaims() {
            return v[5];
        }

        /** @return bytes other tasks handed back to Spark for those */
        public long reclaimedBytes() {
            return v[6];
        }

        /** @return cross-task spills */
        public long spills() {
            return v[7];
        }

        /** @return bytes cross-task spills freed */
        public long spilledBytes() {
            return v[8];
        }

        /** @return tasks that spilled for another (one per cross-task spill) */
        public long victims() {
            return v[9];
        }

        @Override
        public String toString() {
            return "ExecutorArbiter.Status{enabled=" + enabled() + ", crossTaskSpill=" + crossTaskSpill()
                    + ", spillCap=" + Bytes.human(spillCapBytes()) + ", idle=" + Bytes.human(idleBytes())
                    + ", shortGrants=" + shortGrants() + ", reclaims=" + reclaims() + ", reclaimed="
                    + Bytes.human(reclaimedBytes()) + ", spills=" + spills() + ", spilled="
                    + Bytes.human(spilledBytes()) + ", victims=" + victims() + "}";
        }
    }

    private static native void nativeConfigure(boolean enabled, boolean crossTaskSpill, long spillCapBytes);

    private static native long[] nativeStatus();
}
