package org.nativemem.arrow;

import org.nativemem.Bytes;

/**
 * What closing a {@link NativeArrowAllocator} found: buffers still open (a leak), released by the
 * close, with Arrow's own description of them. Immutable.
 */
public final class ArrowCloseReport {
    private final String allocatorName;
    private final long leakedBytes;
    private final long leakedBuffers;
    private final long freedBytes;
    private final String arrowText;

    ArrowCloseReport(String allocatorName, long leakedBytes, long leakedBuffers, long freedBytes, String arrowText) {
        this.allocatorName = allocatorName;
        this.leakedBytes = leakedBytes;
        this.leakedBuffers = leakedBuffers;
        this.freedBytes = freedBytes;
        this.arrowText = arrowText;
    }

    /** @return true if buffers (or child allocators holding memory) were still open at close */
    public boolean hasLeaks() {
        return leakedBytes > 0;
    }

    /** @return bytes Arrow still counted as allocated when the allocator was closed */
    public long leakedBytes() {
        return leakedBytes;
    }

    /**
     * @return allocations (Arrow buffers' memory, shared by slices of a buffer) the close freed;
     *     0 if the allocator could not free memory (see {@link #freedBytes()})
     */
    public long leakedBuffers() {
        return leakedBuffers;
    }

    /** @return bytes of system memory the close freed (normally {@link #leakedBytes()}) */
    public long freedBytes() {
        return freedBytes;
    }

    /**
     * @return Arrow's own text about the leak: the message of the allocator's close error
     *     ({@code "Memory was leaked by query..."} with the allocator tree), then the allocator's
     *     {@code toVerboseString()} (with buffer histories when Arrow's debug mode is on); null if
     *     there was no leak
     */
    public String arrowText() {
        return arrowText;
    }

    /** @return one readable text for logs and errors */
    public String text() {
        if (!hasLeaks()) {
            return "Arrow allocator '" + allocatorName + "' closed with no leaks";
        }
        return "Arrow allocator '" + allocatorName + "' closed with " + leakedBytes + " bytes (" + Bytes.human(leakedBytes)
                + ") still allocated" + (leakedBuffers > 0 ? " in " + leakedBuffers + " buffer allocation(s)" : "")
                + "; the close " + (freedBytes > 0 ? "freed " + Bytes.human(freedBytes) : "could not free them")
                + ". Arrow: " + arrowText;
    }

    @Override
    public String toString() {
        return text();
    }
}
