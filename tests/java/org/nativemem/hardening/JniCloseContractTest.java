package org.nativemem.hardening;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.File;
import java.io.IOException;
import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;
import java.lang.reflect.Modifier;
import java.net.URISyntaxException;
import java.net.URL;
import java.util.ArrayList;
import java.util.Enumeration;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.TreeSet;
import java.util.concurrent.Callable;
import java.util.concurrent.FutureTask;
import java.util.concurrent.TimeUnit;
import java.util.jar.JarEntry;
import java.util.jar.JarFile;

import org.junit.After;
import org.junit.Before;
import org.junit.Test;
import org.nativemem.NativeCloseReport;
import org.nativemem.NativeLibraryLoader;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeReservation;
import org.nativemem.NativeTesting;

/**
 * Close is a contract, checked per JNI export: for every {@code native} method of the product
 * classes of {@code org.nativemem} (found by reflection over the main classes, so a new native
 * without a row here fails), the outcome it has (a) while {@link NativeMemoryManager#close()}
 * waits on a second thread for a call in flight on a third (a listener blocked in
 * {@code reserve}) and (b) after the close returned, called directly with the manager's handle or
 * a reservation handle of that manager, past the Java-side checks.
 *
 * <p>The table is the JNI half of the one next to {@code manager_close} in
 * {@code include/nativemem.h}: a call on the manager's handle is refused as stale from the moment
 * close starts (close removes the handle first, as the engine ABI's {@code acquire}); new work on
 * a reservation (grow, resize, size) is refused as closed while close waits and as stale after;
 * giving back (a reservation's shrink and close) is allowed while close waits, so those bytes are
 * released at once and are no leak; calls without a handle are always allowed. Afterwards the
 * listener has every byte back, the close report names exactly the reservations still held, no
 * handle is left and the library's heap is back to its baseline.
 */
public class JniCloseContractTest extends HardeningSupport {
    /** The manager whose close the table is checked against. */
    static final String NAME = "closing";

    /** What a call does in one phase. */
    enum Outcome {
        /** Returns normally. */
        ALLOWED,
        /** {@code IllegalStateException}: the manager is closed (it is closing: no new work). */
        CLOSED,
        /** {@code IllegalStateException}: the handle (the call's first argument) is stale. */
        STALE
    }

    /** The two phases. */
    enum Phase {
        /** Close has started and waits for a call in flight on another thread. */
        DURING_CLOSE,
        /** Close has returned. */
        AFTER_CLOSE
    }

    /** The handles the calls use; live while close waits, stale after it. */
    static final class Fixture {
        long manager;
        /** Reservation the refused calls use; it holds {@link #WORK_BYTES} (a leak at close). */
        long work;
        /** Reservation shrunk by {@link #SHRINK_BYTES} while close waits. */
        long shrunk;
        /** Reservation closed while close waits. */
        long closedDuring;
        /** Managers {@code nativeCreate} made in this fixture and their listeners. */
        final List<Budget> createdListeners = new ArrayList<Budget>();
    }

    static final long WORK_BYTES = MIB;
    static final long SHRUNK_BYTES = 2 * MIB;
    static final long SHRINK_BYTES = MIB;
    static final long CLOSED_DURING_BYTES = 3 * MIB;
    static final long IN_FLIGHT_BYTES = 8 * MIB;

    interface Args {
        Object[] of(Fixture f, Phase phase);
    }

    interface Check {
        void check(Fixture f, Phase phase, Object result) throws Exception;
    }

    static final class Row {
        final Outcome during;
        final Outcome after;
        final Args args;
        final Check check;

        Row(Outcome during, Outcome after, Args args, Check check) {
            this.during = during;
            this.after = after;
            this.args = args;
            this.check = check;
        }

        Outcome in(Phase phase) {
            return phase == Phase.DURING_CLOSE ? during : after;
        }
    }

    private static final Check NOTHING = (f, p, r) -> {
    };

    /**
     * One row per native: {@code Class.method(parameter types)} → outcome during close, after
     * close, the arguments and, for an allowed call, what its result must be.
     */
    static Map<String, Row> table() {
        Map<String, Row> t = new LinkedHashMap<String, Row>();
        // ---- no handle: always allowed ---------------------------------------------------------
        t.put("NativeLibraryLoader.nativeAbiVersion()", new Row(Outcome.ALLOWED, Outcome.ALLOWED,
                (f, p) -> new Object[0],
                (f, p, r) -> assertEquals("ABI version", abiVersionOfTheClasses(), ((Integer) r).intValue())));
        t.put("NativeMemoryManager.nativeApiAddress()", new Row(Outcome.ALLOWED, Outcome.ALLOWED,
                (f, p) -> new Object[0],
                (f, p, r) -> assertTrue("a table address", (Long) r != 0)));
        t.put("NativeMemoryManager.nativeLiveHandles()", new Row(Outcome.ALLOWED, Outcome.ALLOWED,
                (f, p) -> new Object[0],
                (f, p, r) -> assertEquals("{managers, reservations}", 2, ((long[]) r).length)));
        // The container governor is process-wide: no handle, unaffected by any manager's close.
        t.put("ContainerGovernor.nativeStatus()", new Row(Outcome.ALLOWED, Outcome.ALLOWED,
                (f, p) -> new Object[0],
                (f, p, r) -> assertEquals("17 figures", 17, ((long[]) r).length)));
        t.put("ContainerGovernor.nativeForensics()", new Row(Outcome.ALLOWED, Outcome.ALLOWED,
                (f, p) -> new Object[0],
                (f, p, r) -> assertTrue("no governor (null) or its history", r == null || r instanceof String)));
        // Executor-wide arbitration is process-wide too: no handle; status skips a closing manager.
        t.put("ExecutorArbiter.nativeStatus()", new Row(Outcome.ALLOWED, Outcome.ALLOWED,
                (f, p) -> new Object[0],
                (f, p, r) -> assertEquals("10 figures", 10, ((long[]) r).length)));
        t.put("ExecutorArbiter.nativeConfigure(boolean,boolean,long)", new Row(Outcome.ALLOWED, Outcome.ALLOWED,
                (f, p) -> new Object[] {true, false, 64L << 20}, NOTHING));
        t.put("ContainerGovernor.nativeStop()", new Row(Outcome.ALLOWED, Outcome.ALLOWED,
                (f, p) -> new Object[0], NOTHING));
        t.put("ContainerGovernor.nativeStart(long,double,double,long,long)", new Row(Outcome.ALLOWED,
                Outcome.ALLOWED,
                (f, p) -> new Object[] {0L, 0.85, 0.93, 20L, 1000L},
                (f, p, r) -> {
                    // Governing (where this machine's cgroup sets a limit) or not: it says which.
                    assertTrue(String.valueOf(r), ((String) r).contains("govern"));
                    call("ContainerGovernor.nativeStop");
                }));
        t.put("NativeMemoryManager.nativeCreate(String,ReservationListener,long,long,long,long)",
                new Row(Outcome.ALLOWED, Outcome.ALLOWED,
                        (f, p) -> {
                            Budget other = new Budget();
                            f.createdListeners.add(other);
                            return new Object[] {"created " + p, other, BLOCK, -1L, 10_000L, 0L};
                        },
                        (f, p, r) -> {
                            // Another manager: it works and closes cleanly whatever the first does.
                            long created = (Long) r;
                            assertTrue("a handle", created != 0);
                            long reservation = (Long) call("NativeMemoryManager.nativeReserve", created, "p", "c", MIB);
                            assertEquals(MIB, ((Long) call("NativeReservation.nativeSize", reservation)).longValue());
                            call("NativeMemoryManager.nativeClose", created);
                            assertEquals("the other manager's listener is repaid", 0,
                                    f.createdListeners.get(f.createdListeners.size() - 1).reserved.get());
                        }));
        // ---- the manager's handle: stale as soon as close starts ----------------------------------
        Args manager = (f, p) -> new Object[] {f.manager};
        t.put("NativeMemoryManager.nativeClose(long)", new Row(Outcome.STALE, Outcome.STALE, manager, NOTHING));
        t.put("NativeMemoryManager.nativeUsedBytes(long)", new Row(Outcome.STALE, Outcome.STALE, manager, NOTHING));
        t.put("NativeMemoryManager.nativePeakBytes(long)", new Row(Outcome.STALE, Outcome.STALE, manager, NOTHING));
        t.put("NativeMemoryManager.nativeReservedBytes(long)",
                new Row(Outcome.STALE, Outcome.STALE, manager, NOTHING));
        t.put("NativeMemoryManager.nativeUsageReport(long)", new Row(Outcome.STALE, Outcome.STALE, manager, NOTHING));
        t.put("NativeMemoryManager.nativeStats(long)", new Row(Outcome.STALE, Outcome.STALE, manager, NOTHING));
        Args managerAndBytes = (f, p) -> new Object[] {f.manager, MIB};
        t.put("NativeMemoryManager.nativeSpill(long,long)",
                new Row(Outcome.STALE, Outcome.STALE, managerAndBytes, NOTHING));
        t.put("NativeMemoryManager.nativeReleaseUnused(long,long)",
                new Row(Outcome.STALE, Outcome.STALE, managerAndBytes, NOTHING));
        t.put("NativeMemoryManager.nativeReclaim(long,long)",
                new Row(Outcome.STALE, Outcome.STALE, managerAndBytes, NOTHING));
        t.put("NativeMemoryManager.nativeReserve(long,String,String,long)", new Row(Outcome.STALE, Outcome.STALE,
                (f, p) -> new Object[] {f.manager, "late", "late", MIB}, NOTHING));
        // ---- a reservation's handle: new work refused, giving back allowed while close waits ----
        t.put("NativeReservation.nativeGrow(long,long)", new Row(Outcome.CLOSED, Outcome.STALE,
                (f, p) -> new Object[] {f.work, MIB}, NOTHING));
        t.put("NativeReservation.nativeResize(long,long)", new Row(Outcome.CLOSED, Outcome.STALE,
                (f, p) -> new Object[] {f.work, 0L}, NOTHING));
        t.put("NativeReservation.nativeSize(long)", new Row(Outcome.CLOSED, Outcome.STALE,
                (f, p) -> new Object[] {f.work}, NOTHING));
        t.put("NativeReservation.nativePeak(long)", new Row(Outcome.CLOSED, Outcome.STALE,
                (f, p) -> new Object[] {f.work}, NOTHING));
        t.put("NativeReservation.nativeShrink(long,long)", new Row(Outcome.ALLOWED, Outcome.STALE,
                (f, p) -> new Object[] {f.shrunk, SHRINK_BYTES}, NOTHING));
        // After close: a reservation the close released (not one closed by its user).
        t.put("NativeReservation.nativeClose(long)", new Row(Outcome.ALLOWED, Outcome.STALE,
                (f, p) -> new Object[] {p == Phase.DURING_CLOSE ? f.closedDuring : f.work}, NOTHING));
        return t;
    }

    private String logLevel;

    @Before
    public void quietNativeLog() {
        // Every round's close reclaims the reservations still held: a leak report each, by design.
        logLevel = NativeTesting.setNativeLogLevel("error");
    }

    @After
    public void restoreNativeLog() {
        NativeTesting.setNativeLogLevel(logLevel);
    }

    /** Every native of the product classes has a row, and every row a native. */
    @Test
    public void everyNativeOfTheProductClassesHasARow() throws Exception {
        Map<String, Method> natives = productNatives();
        Map<String, Row> table = table();
        TreeSet<String> missing = new TreeSet<String>(natives.keySet());
        missing.removeAll(table.keySet());
        TreeSet<String> unknown = new TreeSet<String>(table.keySet());
        unknown.removeAll(natives.keySet());
        assertTrue("natives without a row in the close contract (add one): " + missing, missing.isEmpty());
        assertTrue("rows without a native (remove them): " + unknown, unknown.isEmpty());
        for (String known : new String[] {"NativeLibraryLoader.nativeAbiVersion()",
                "NativeMemoryManager.nativeClose(long)", "NativeReservation.nativeGrow(long,long)"}) {
            assertTrue("the enumeration found " + known + ": " + natives.keySet(), natives.containsKey(known));
        }
    }

    /**
     * Each native while close waits and after it, twice (the first round also warms the library's
     * tables up): the documented outcome, the listener repaid exactly, the close report naming
     * exactly what was still held, and the library's heap back to its baseline after the second.
     */
    @Test
    public void everyNativeHasItsDocumentedOutcomeDuringAndAfterClose() throws Exception {
        Map<String, Method> natives = productNatives();
        long[] handlesBefore = Internals.liveHandles();
        round(natives, 1);
        long[] heapBefore = NativeTesting.quietNativeHeap(10_000);
        round(natives, 2);
        assertArrayEquals("no manager or reservation handle left", handlesBefore, Internals.liveHandles());
        long[] heapAfter = NativeTesting.awaitNativeHeap(heapBefore, 5_000);
        assertEquals("the library's live blocks after the second round", heapBefore[0], heapAfter[0]);
        assertEquals("the library's live bytes after the second round", heapBefore[1], heapAfter[1]);
    }

    private void round(Map<String, Method> natives, int round) throws Exception {
        final MisuseMatrixTest.Blocking listener = new MisuseMatrixTest.Blocking();
        final NativeMemoryManager m = manager(NAME, listener, smallBlocks().withCloseTimeoutMillis(60_000));
        final Fixture f = new Fixture();
        f.manager = m.handle();
        f.work = Internals.handleOf(m.newReservation("contract", "work", WORK_BYTES));
        f.shrunk = Internals.handleOf(m.newReservation("contract", "shrunk", SHRUNK_BYTES));
        f.closedDuring = Internals.handleOf(m.newReservation("contract", "closed-during", CLOSED_DURING_BYTES));
        final long probe = Internals.handleOf(m.newReservation("contract", "probe", 0));
        final NativeReservation inFlight = m.newReservation("contract", "in-flight", 0);
        assertEquals(listener.reserved.get(), m.reservedBytes());

        // A call in flight: a grow blocked in the listener's reserve, on its own thread.
        listener.armed.set(true);
        FutureTask<Void> grow = start("in-flight grow", () -> {
            inFlight.grow(IN_FLIGHT_BYTES);
            return null;
        });
        assertTrue("the grow reached the listener", listener.entered.await(10, TimeUnit.SECONDS));
        listener.armed.set(false);
        // Close on a second thread: it waits for the grow.
        FutureTask<Void> close = start("closer", () -> {
            m.close();
            return null;
        });
        // Close is under way once new work on a reservation of the manager is refused.
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
        while (true) {
            try {
                call("NativeReservation.nativeSize", probe);
            } catch (IllegalStateException e) {
                assertEquals(closedMessage(f), e.getMessage());
                break;
            }
            assertTrue("close did not start", System.nanoTime() < deadline);
            Thread.sleep(1);
        }

        List<String> failures = new ArrayList<String>();
        Map<String, Row> table = table();
        for (Phase phase : Phase.values()) {
            if (phase == Phase.AFTER_CLOSE) {
                assertFalse("close waits for the grow", close.isDone());
                listener.release.countDown();
                grow.get(10, TimeUnit.SECONDS);
                close.get(10, TimeUnit.SECONDS);
            }
            for (Map.Entry<String, Row> e : table.entrySet()) {
                Method nat = natives.get(e.getKey());
                assertNotNull("no native " + e.getKey(), nat);
                String failure = check(nat, e.getKey(), e.getValue(), f, phase);
                if (failure != null) {
                    failures.add("round " + round + ", " + phase + ": " + failure);
                }
            }
            if (phase == Phase.DURING_CLOSE) {
                assertFalse("close still waits for the grow after the table", close.isDone());
            }
        }
        if (!failures.isEmpty()) {
            fail(failures.size() + " native(s) broke the close contract:\n" + String.join("\n", failures));
        }

        // The listener got every byte back; the close reclaimed exactly what was still held: the
        // refused calls changed nothing, the give-backs released at once (no leak).
        assertEquals("every byte granted to the manager came back", 0, listener.reserved.get());
        NativeCloseReport report = m.closeReport();
        assertNotNull("close succeeded", report);
        Map<String, Long> leaked = new TreeMap<String, Long>();
        for (NativeCloseReport.Leak leak : report.leaks()) {
            assertEquals(leak.toString(), NativeCloseReport.LeakKind.RESERVATION, leak.kind());
            assertEquals(leak.toString(), "root/contract", leak.pool());
            leaked.put(leak.consumer().replaceAll("#\\d+$", ""), leak.bytes());
        }
        Map<String, Long> expected = new TreeMap<String, Long>();
        expected.put("in-flight", IN_FLIGHT_BYTES);
        expected.put("shrunk", SHRUNK_BYTES - SHRINK_BYTES);
        expected.put("work", WORK_BYTES);
        assertEquals("reservations the close reclaimed (" + report.text() + ")", expected, leaked);
        assertEquals(IN_FLIGHT_BYTES + SHRUNK_BYTES - SHRINK_BYTES + WORK_BYTES, report.leakedBytes());
        for (Budget other : f.createdListeners) {
            assertEquals("managers created during the round repaid", 0, other.reserved.get());
        }
        // The Java objects agree: closed, and closing them again is a no-op.
        assertTrue(inFlight.isClosed());
        inFlight.close();
        for (Thread t : threads) {
            t.join(10_000);
            assertFalse(t.getName() + " ended", t.isAlive());
        }
        threads.clear();
    }

    /** Calls one native in one phase; returns a description of the breach, or null. */
    private static String check(Method nat, String key, Row row, Fixture f, Phase phase) {
        Outcome expected = row.in(phase);
        Object[] args = row.args.of(f, phase);
        Object result;
        try {
            result = nat.invoke(null, args);
        } catch (InvocationTargetException e) {
            Throwable t = e.getCause();
            if (expected == Outcome.ALLOWED) {
                return key + ": documented as allowed, threw " + t;
            }
            if (t.getClass() != IllegalStateException.class) {
                return key + ": documented as " + expected + " (IllegalStateException), threw " + t;
            }
            String want = expected == Outcome.CLOSED ? closedMessage(f) : staleMessage(nat, (Long) args[0]);
            if (!want.equals(t.getMessage())) {
                return key + ": documented as " + expected + " <" + want + ">, message <" + t.getMessage() + ">";
            }
            return null;
        } catch (IllegalAccessException e) {
            throw new AssertionError("cannot call " + key, e);
        }
        if (expected != Outcome.ALLOWED) {
            return key + ": documented as " + expected + ", returned " + describe(result);
        }
        try {
            row.check.check(f, phase, result);
        } catch (Throwable t) {
            return key + ": allowed, but its result is wrong: " + t;
        }
        return null;
    }

    private static String closedMessage(Fixture f) {
        return "memory manager '" + NAME + "' (handle " + hex(f.manager) + ") is closed";
    }

    private static String staleMessage(Method nat, long handle) {
        String kind = nat.getDeclaringClass() == NativeReservation.class ? "reservation" : "memory manager";
        return kind + " handle " + hex(handle) + " is stale: it was closed or destroyed";
    }

    private static String describe(Object result) {
        if (result instanceof long[]) {
            return java.util.Arrays.toString((long[]) result);
        }
        if (result instanceof Object[]) {
            return java.util.Arrays.deepToString((Object[]) result);
        }
        return String.valueOf(result);
    }

    /** Threads this test started; joined at the end of each round (their thread-locals freed). */
    private final List<Thread> threads = new ArrayList<Thread>();

    private <T> FutureTask<T> start(String name, Callable<T> body) {
        FutureTask<T> task = new FutureTask<T>(body);
        Thread t = new Thread(task, "close-contract " + name);
        t.setDaemon(true);
        threads.add(t);
        t.start();
        return task;
    }

    private static int abiVersionOfTheClasses() throws Exception {
        java.lang.reflect.Field f = NativeLibraryLoader.class.getDeclaredField("ABI_VERSION");
        f.setAccessible(true);
        return f.getInt(null);
    }

    /** Calls the native {@code Class.method} (by simple class name) with {@code args}. */
    private static Object call(String classAndMethod, Object... args) throws Exception {
        for (Map.Entry<String, Method> e : productNatives().entrySet()) {
            if (e.getKey().startsWith(classAndMethod + "(")) {
                try {
                    return e.getValue().invoke(null, args);
                } catch (InvocationTargetException ex) {
                    Throwable t = ex.getCause();
                    if (t instanceof Exception) {
                        throw (Exception) t;
                    }
                    throw (Error) t;
                }
            }
        }
        throw new AssertionError("no native " + classAndMethod);
    }

    private static Map<String, Method> productNativesCache;

    /**
     * Every {@code native} method of the classes of {@code org.nativemem} and its subpackages in
     * the main classes (the directory or jar {@link NativeMemoryManager} was loaded from; the
     * test-only {@code NativeTesting} is not a product class), made accessible, by
     * {@code SimpleBinaryName.method(parameter simple names)}.
     */
    static synchronized Map<String, Method> productNatives() throws IOException, URISyntaxException {
        if (productNativesCache != null) {
            return productNativesCache;
        }
        URL location = NativeMemoryManager.class.getProtectionDomain().getCodeSource().getLocation();
        File root = new File(location.toURI());
        List<String> classNames = new ArrayList<String>();
        if (root.isDirectory()) {
            collect(root, new File(root, "org/nativemem"), classNames);
        } else {
            try (JarFile jar = new JarFile(root)) {
                for (Enumeration<JarEntry> en = jar.entries(); en.hasMoreElements();) {
                    String n = en.nextElement().getName();
                    if (n.startsWith("org/nativemem/") && n.endsWith(".class")) {
                        classNames.add(n.substring(0, n.length() - ".class".length()).replace('/', '.'));
                    }
                }
            }
        }
        assertTrue("no product classes under " + root, classNames.contains(NativeMemoryManager.class.getName()));
        Map<String, Method> natives = new TreeMap<String, Method>();
        ClassLoader loader = NativeMemoryManager.class.getClassLoader();
        for (String className : classNames) {
            if (className.equals("org.nativemem.NativeTesting")) {
                continue;
            }
            Class<?> c;
            try {
                c = Class.forName(className, false, loader);
            } catch (ClassNotFoundException e) {
                throw new AssertionError("cannot load product class " + className, e);
            }
            for (Method m : c.getDeclaredMethods()) {
                if (!Modifier.isNative(m.getModifiers())) {
                    continue;
                }
                assertTrue(className + "." + m.getName() + " is static", Modifier.isStatic(m.getModifiers()));
                StringBuilder key = new StringBuilder(c.getName().substring(c.getName().lastIndexOf('.') + 1))
                        .append('.').append(m.getName()).append('(');
                Class<?>[] params = m.getParameterTypes();
                for (int i = 0; i < params.length; i++) {
                    key.append(i == 0 ? "" : ",").append(params[i].getSimpleName());
                }
                m.setAccessible(true);
                natives.put(key.append(')').toString(), m);
            }
        }
        productNativesCache = natives;
        return natives;
    }

    private static void collect(File root, File dir, List<String> out) {
        File[] files = dir.listFiles();
        if (files == null) {
            return;
        }
        for (File file : files) {
            if (file.isDirectory()) {
                collect(root, file, out);
            } else if (file.getName().endsWith(".class")) {
                String rel = root.toURI().relativize(file.toURI()).getPath();
                out.add(rel.substring(0, rel.length() - ".class".length()).replace('/', '.'));
            }
        }
    }
}
