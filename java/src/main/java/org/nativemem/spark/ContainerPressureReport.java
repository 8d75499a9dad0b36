package org.nativemem.spark;

import java.io.Serializable;

/**
 * What an executor's plugin sends the driver's when its container governor enters hard pressure
 * (and, best effort, when the executor JVM is being terminated after pressure): the executor, the
 * governor's state and its last snapshots of the executor's native usage per task with the
 * container's figures. The driver logs it, so a lost executor can be tied to its native usage from
 * the driver's log. Immutable.
 */
public final class ContainerPressureReport implements Serializable {
    private static final long serialVersionUID = 1L;

    /** Longest text sent (the forensics of many tasks are cut there). */
    static final int MAX_TEXT = 16 * 1024;

    private final String executorId;
    private final String reason;
    private final String text;

    ContainerPressureReport(String executorId, String reason, String text) {
        this.executorId = executorId;
        this.reason = reason;
        this.text = text.length() <= MAX_TEXT ? text : text.substring(0, MAX_TEXT) + "\n... (cut)";
    }

    /** @return the executor that sent it */
    public String executorId() {
        return executorId;
    }

    /** @return why it was sent: {@code hard pressure} or {@code terminating} */
    public String reason() {
        return reason;
    }

    /** @return the governor's state and its snapshots of the executor's native usage */
    public String text() {
        return text;
    }

    @Override
    public String toString() {
        return "executor " + executorId + " (" + reason + "): " + text;
    }
}
