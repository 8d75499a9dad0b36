package org.nativemem.spark;

import java.lang.reflect.Method;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.function.Consumer;

import org.apache.spark.scheduler.SparkListener;
import org.apache.spark.scheduler.SparkListenerApplicationEnd;
import org.apache.spark.scheduler.SparkListenerEnvironmentUpdate;
import org.apache.spark.scheduler.SparkListenerEvent;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import scala.Tuple2;

/**
 * Puts the application's sizing answer ({@link ApplicationMemoryView#sizing()}) where Spark's
 * history server shows it: among the "Spark Properties" of the Environment page (and of
 * {@code /api/v1/applications/<app>/environment}), live and in the event log.
 *
 * <h2>Why an environment update</h2>
 * The driver plugin's {@code shutdown} runs after Spark stopped its listener bus, so nothing it
 * posts reaches the event log. And a history server renders only what Spark's own
 * {@code AppStatusListener} keeps from the events it replays: an event of a class of ours would be
 * written to the log but shown nowhere (unless the history server loaded a UI plugin of ours),
 * and an accumulator shows on the stage page only when tasks update it. What it does render from
 * a driver-side event, in 3.5 as in 4.x, is the last {@code SparkListenerEnvironmentUpdate}: the
 * Environment page shows its "Spark Properties", and {@code EventLoggingListener} writes every
 * such event (redacted as Spark's own). So this listener, registered by the driver plugin on the
 * listener bus, keeps the last environment Spark posted (at start, and again after each
 * {@code addJar}/{@code addFile}) and posts it again with three entries added:
 *
 * <table>
 *   <caption>Entries among the Spark Properties (keys outside {@code spark.nativemem.*}: they are
 *       not settings)</caption>
 *   <tr><td>{@value #OVERHEAD_KEY}</td><td>the recommended {@code spark.executor.memoryOverhead},
 *       e.g. {@code 384m}, or {@code none}</td></tr>
 *   <tr><td>{@value #OFF_HEAP_KEY}</td><td>the recommended {@code spark.memory.offHeap.size}, or
 *       {@code none}</td></tr>
 *   <tr><td>{@value #ANSWER_KEY}</td><td>when ({@code at application end} or
 *       {@code so far, application running}), the whole answer with its arithmetic and which
 *       executor sets each setting, and the task accumulators' values</td></tr>
 * </table>
 *
 * <p>When: at {@code onApplicationEnd} (the first thing {@code SparkContext.stop} posts; the bus
 * still runs then), and while the application runs whenever the recommended settings changed, at
 * most once per {@value #REFRESH_INTERVAL_MS} ms (so an application whose end is never posted, a
 * killed driver, still shows a recent answer; each update is one environment event, a few tens of
 * kilobytes with the classpath, in the event log). An executor's last report arriving after the
 * end but before the bus stops updates the answer again. The driver's log line at the plugin's
 * shutdown stays the complete answer (it also counts reports that arrived after the bus stopped).
 *
 * <p>Spark's event class takes Scala collections whose Java signatures differ between Scala 2.12
 * (Spark 3.5) and 2.13 (4.x), so they are converted reflectively through
 * {@code scala.collection.JavaConverters} (same method names in both). Nothing here throws into
 * Spark: a failure is logged once and the answer stays in the driver's log only.
 */
final class SizingPublisher extends SparkListener {
    private static final Logger LOG = LoggerFactory.getLogger(SizingPublisher.class);

    /** Prefix of the entries (not {@code spark.nativemem.}: they are not settings). */
    static final String PREFIX = "nativemem.sizing";
    /** The recommended {@code spark.executor.memoryOverhead}. */
    static final String OVERHEAD_KEY = "nativemem.sizing.spark.executor.memoryOverhead";
    /** The recommended {@code spark.memory.offHeap.size}. */
    static final String OFF_HEAP_KEY = "nativemem.sizing.spark.memory.offHeap.size";
    /** The whole answer, with its arithmetic. */
    static final String ANSWER_KEY = "nativemem.sizing";
    /** The environment section Spark's Environment page shows the entries in. */
    static final String SECTION = "Spark Properties";
    /** Least time between two updates while the application runs, ms. */
    static final long REFRESH_INTERVAL_MS = 30_000;

    /** Posts to Spark's listener bus ({@code sc.listenerBus()::post}). */
    private final Consumer<SparkListenerEvent> bus;
    private final ApplicationMemoryView view;
    /** The last environment Spark posted (ours included: our entries are replaced each time). */
    private volatile SparkListenerEnvironmentUpdate environment;
    /** Guarded by this. */
    private boolean ended;
    private long lastPostMillis = Long.MIN_VALUE / 2;
    private String lastSettings = "";
    private boolean warned;

    /**
     * @param bus posts an event to Spark's listener bus (the driver plugin passes
     *     {@code sc.listenerBus()::post}; non-blocking, events after the bus stopped are dropped)
     * @param view the executors' reports
     */
    SizingPublisher(Consumer<SparkListenerEvent> bus, ApplicationMemoryView view) {
        this.bus = bus;
        this.view = view;
    }

    @Override
    public void onEnvironmentUpdate(SparkListenerEnvironmentUpdate event) {
        environment = event;
    }

    @Override
    public void onApplicationEnd(SparkListenerApplicationEnd event) {
        synchronized (this) {
            ended = true;
        }
        publish(true);
    }

    /**
     * After the driver plugin took an executor's report: posts the answer again if its settings
     * changed (while running: at most once per {@value #REFRESH_INTERVAL_MS} ms).
     */
    void reportArrived() {
        boolean end;
        synchronized (this) {
            if (environment == null || settings().equals(lastSettings)) {
                // Executors may report before Spark posts its environment (local mode): later.
                return;
            }
            end = ended;
            if (!end && System.currentTimeMillis() - lastPostMillis < REFRESH_INTERVAL_MS) {
                return;
            }
        }
        publish(end);
    }

    /** The recommended settings as the entries show them, e.g. {@code 384m/9m}. */
    private String settings() {
        return mib(view.recommendedOverheadBytes()) + "/" + mib(view.recommendedOffHeapBytes());
    }

    private static String mib(long bytes) {
        return bytes < 0 ? "none" : (bytes >> 20) + "m";
    }

    /** The entries for the current answer. */
    Map<String, String> entries(boolean end) {
        Map<String, String> m = new LinkedHashMap<>();
        m.put(OVERHEAD_KEY, mib(view.recommendedOverheadBytes()));
        m.put(OFF_HEAP_KEY, mib(view.recommendedOffHeapBytes()));
        m.put(ANSWER_KEY, (end ? "at application end: " : "so far, application running: ") + view.sizing()
                + "; task accumulators: " + NativeTaskMetrics.driverValues());
        return m;
    }

    private synchronized void publish(boolean end) {
        SparkListenerEnvironmentUpdate env = environment;
        if (env == null) {
            warnOnce("Spark posted no environment yet", null);
            return;
        }
        try {
            SparkListenerEnvironmentUpdate update = withEntries(env, entries(end));
            if (update == null) {
                warnOnce("the environment has no " + SECTION, null);
                return;
            }
            lastSettings = settings();
            lastPostMillis = System.currentTimeMillis();
            bus.accept(update);
        } catch (ReflectiveOperationException | RuntimeException | LinkageError e) {
            warnOnce("cannot post it", e);
        }
    }

    private void warnOnce(String why, Throwable e) {
        if (!warned) {
            warned = true;
            LOG.warn("nativemem: the application's sizing answer is not on Spark's Environment page ({}; logged once,"
                    + " it is in the driver's log at the end){}", why, e == null ? "" : ": " + e);
        }
    }

    /**
     * A copy of {@code env} whose {@value #SECTION} hold {@code entries} in place of any earlier
     * {@value #PREFIX}* entries.
     *
     * @return the new event, or null if {@code env} has no {@value #SECTION}
     */
    @SuppressWarnings("unchecked")
    static SparkListenerEnvironmentUpdate withEntries(SparkListenerEnvironmentUpdate env, Map<String, String> entries)
            throws ReflectiveOperationException {
        Map<Object, Object> details = (Map<Object, Object>) toJava("mapAsJavaMapConverter", scala.collection.Map.class,
                env.environmentDetails());
        Map<Object, Object> out = new LinkedHashMap<>();
        boolean found = false;
        for (Map.Entry<Object, Object> section : details.entrySet()) {
            if (!SECTION.equals(section.getKey())) {
                out.put(section.getKey(), section.getValue());
                continue;
            }
            found = true;
            List<Object> props = new ArrayList<>();
            for (Object kv : (List<Object>) toJava("seqAsJavaListConverter", scala.collection.Seq.class,
                    section.getValue())) {
                Object key = kv instanceof Tuple2 ? ((Tuple2<?, ?>) kv)._1() : null;
                if (!(key instanceof String && ((String) key).startsWith(PREFIX))) {
                    props.add(kv);
                }
            }
            for (Map.Entry<String, String> e : entries.entrySet()) {
                props.add(new Tuple2<>(e.getKey(), e.getValue()));
            }
            out.put(section.getKey(), toScala("asScalaBufferConverter", List.class, props));
        }
        if (!found) {
            return null;
        }
        return new SparkListenerEnvironmentUpdate(
                (scala.collection.Map<String, scala.collection.Seq<Tuple2<String, String>>>) toScala(
                        "mapAsScalaMapConverter", Map.class, out));
    }

    /** {@code JavaConverters.<converter>(value).asJava()}. */
    private static Object toJava(String converter, Class<?> type, Object value) throws ReflectiveOperationException {
        return convert(converter, type, value, "asJava");
    }

    /** {@code JavaConverters.<converter>(value).asScala()}. */
    private static Object toScala(String converter, Class<?> type, Object value) throws ReflectiveOperationException {
        return convert(converter, type, value, "asScala");
    }

    private static Object convert(String converter, Class<?> type, Object value, String as)
            throws ReflectiveOperationException {
        Method m = Class.forName("scala.collection.JavaConverters").getMethod(converter, type);
        Object decorator = m.invoke(null, value);
        Method get = decorator.getClass().getMethod(as);
        get.setAccessible(true);
        Object result = get.invoke(decorator);
        if (result == null) {
            throw new IllegalStateException(converter + " gave null");
        }
        return result;
    }

    /** For tests: the entries of {@code env}'s {@value #SECTION} that start with {@value #PREFIX}. */
    @SuppressWarnings("unchecked")
    static Map<String, String> entriesOf(SparkListenerEnvironmentUpdate env) throws ReflectiveOperationException {
        Map<Object, Object> details = (Map<Object, Object>) toJava("mapAsJavaMapConverter", scala.collection.Map.class,
                env.environmentDetails());
        Object props = details.get(SECTION);
        if (props == null) {
            return Collections.emptyMap();
        }
        Map<String, String> m = new LinkedHashMap<>();
        for (Object kv : (List<Object>) toJava("seqAsJavaListConverter", scala.collection.Seq.class, props)) {
            Tuple2<?, ?> t = (Tuple2<?, ?>) kv;
            if (t._1() instanceof String && ((String) t._1()).startsWith(PREFIX)) {
                m.put((String) t._1(), String.valueOf(t._2()));
            }
        }
        return m;
    }
}
