package org.nativemem.e2e;

import org.apache.spark.memory.MemoryConsumer;
import org.apache.spark.memory.MemoryMode;
import org.apache.spark.memory.TaskMemoryManager;

/**
 * A JVM operator's memory as Spark sees it: a {@link MemoryConsumer} of the task that acquires
 * execution memory and, when another consumer needs memory, spills by freeing exactly what is
 * asked (like a sorter writing part of its buffer to disk). Used on the task thread only.
 */
final class JvmConsumer extends MemoryConsumer {
    /** When false, spill requests free nothing (a consumer with nothing left to spill). */
    boolean spillable = true;
    int spills;
    long spilledBytes;

    JvmConsumer(TaskMemoryManager tmm, MemoryMode mode) {
        super(tmm, tmm.pageSizeBytes(), mode);
    }

    long acquire(long bytes) {
        return acquireMemory(bytes);
    }

    void releaseAll() {
        if (getUsed() > 0) {
            freeMemory(getUsed());
        }
    }

    @Override
    public long spill(long size, MemoryConsumer trigger) {
        if (trigger == this || !spillable) {
            return 0;
        }
        long freed = Math.min(size, getUsed());
        if (freed > 0) {
            freeMemory(freed);
            spills++;
            spilledBytes += freed;
        }
        return freed;
    }

    @Override
    public String toString() {
        return "e2e-jvm-consumer(" + getMode() + ", used " + getUsed() + ")";
    }
}
