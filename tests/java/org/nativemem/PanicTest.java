package org.nativemem;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import java.util.concurrent.TimeUnit;
import org.junit.Test;

/** A Rust panic in an export becomes a Java exception; the JVM and the library carry on. */
public class PanicTest extends NativeTestSupport {

    @Test
    public void panicBecomesNativeMemoryException() {
        NativeMemoryException e = expect(NativeMemoryException.class, () -> NativeTesting.panic("boom"));
        assertEquals("native panic: boom", e.getMessage());
        // Again: panicking does not poison anything.
        e = expect(NativeMemoryException.class, () -> NativeTesting.panic("again"));
        assertEquals("native panic: again", e.getMessage());
        CountingListener listener = new CountingListener();
        try (NativeMemoryManager m = NativeMemoryManager.create("after-panic", listener, smallBlocks());
                NativeReservation r = m.newReservation("p", MIB)) {
            assertEquals(MIB, m.usedBytes());
            assertEquals(MIB, r.size());
        }
        assertEquals(0, listener.reserved.get());
    }

    @Test
    public void panicDuringAManagerCallReleasesTheCallSoCloseDoesNotWait() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = manager("panicky", listener, smallBlocks().withCloseTimeoutMillis(30_000));
        NativeReservation r = m.newReservation("p", 2 * MIB);
        NativeMemoryException e = expect(NativeMemoryException.class, () -> NativeTesting.panicInCall(m.handle()));
        assertEquals("native panic: operator bug while holding manager 'panicky'", e.getMessage());
        assertEquals(2 * MIB, m.usedBytes());
        long started = System.nanoTime();
        m.close();
        assertTrue("close did not wait for a call that unwound",
                System.nanoTime() - started < TimeUnit.SECONDS.toNanos(5));
        assertEquals(0, listener.reserved.get());
        r.close();
    }
}
