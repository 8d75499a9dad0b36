package org.nativemem.examples;

/**
 * A DataFusion query run by {@link DataFusionTask} failed; thrown by {@link DataFusionTask#await()}.
 *
 * <p>The message is DataFusion's error. When the query failed because memory was refused
 * ({@link #resourcesExhausted()}: DataFusion's {@code ResourcesExhausted}, e.g. an operator that
 * could not spill any further), it carries nativemem's refusal with the task's usage report (the
 * pool tree with used / peak / limit and the largest consumers). The {@link DataFusionTask} stays
 * usable: start another query or close it.
 */
public class DataFusionQueryException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    private final boolean resourcesExhausted;

    /**
     * Called by the native library (keep this signature: {@code (Ljava/lang/String;Z)V}).
     *
     * @param message DataFusion's error, with nativemem's usage report for a refusal
     * @param resourcesExhausted true if DataFusion failed with {@code ResourcesExhausted}
     */
    public DataFusionQueryException(String message, boolean resourcesExhausted) {
        super(message);
        this.resourcesExhausted = resourcesExhausted;
    }

    /**
     * @return true if the query failed because memory was refused (DataFusion's
     *     {@code ResourcesExhausted}); false for any other DataFusion error (cancelled, I/O of a
     *     spill file, a plan error)
     */
    public boolean resourcesExhausted() {
        return resourcesExhausted;
    }
}
