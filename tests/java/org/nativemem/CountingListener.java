package org.nativemem;

import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;

/**
 * A listener with a capacity that records every call. Subclasses override {@link #beforeReserve}
 * / {@link #beforeUnreserve} to block or throw.
 */
class CountingListener implements ReservationListener {
    final long capacity;
    final AtomicLong reserved = new AtomicLong();
    final AtomicInteger reserveCalls = new AtomicInteger();
    final AtomicInteger unreserveCalls = new AtomicInteger();
    final List<Long> reserveRequests = Collections.synchronizedList(new ArrayList<Long>());
    final Set<Thread> threads = ConcurrentHashMap.newKeySet();

    CountingListener() {
        this(Long.MAX_VALUE);
    }

    CountingListener(long capacity) {
        this.capacity = capacity;
    }

    void beforeReserve(long bytes) {
    }

    void beforeUnreserve(long bytes) {
    }

    @Override
    public long reserve(long bytes) {
        reserveCalls.incrementAndGet();
        reserveRequests.add(bytes);
        threads.add(Thread.currentThread());
        if (bytes <= 0) {
            throw new AssertionError("reserve(" + bytes + ")");
        }
        beforeReserve(bytes);
        while (true) {
            long cur = reserved.get();
            long grant = Math.min(bytes, capacity - cur);
            if (reserved.compareAndSet(cur, cur + grant)) {
                return grant;
            }
        }
    }

    @Override
    public void unreserve(long bytes) {
        unreserveCalls.incrementAndGet();
        threads.add(Thread.currentThread());
        if (bytes <= 0) {
            throw new AssertionError("unreserve(" + bytes + ")");
        }
        beforeUnreserve(bytes);
        long now = reserved.addAndGet(-bytes);
        if (now < 0) {
            throw new AssertionError("unreserve(" + bytes + ") took back more than was granted: " + now);
        }
    }
}
