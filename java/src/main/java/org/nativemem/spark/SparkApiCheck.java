package org.nativemem.spark;

import java.io.IOException;
import java.io.InputStream;
import java.lang.invoke.MethodHandles;
import java.lang.invoke.MethodType;
import java.lang.reflect.Method;
import java.lang.reflect.Modifier;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.List;
import java.util.Properties;

/**
 * What this package needs from Spark, checked against the Spark it runs in.
 *
 * <p>One {@code nativemem.jar} serves every supported Spark release (3.5 to 4.3), so it is
 * compiled against the oldest one and calls only members that exist in all of them. A member
 * that a newer release removed or changed would otherwise surface as a {@link LinkageError}
 * ({@code NoSuchFieldError}, {@code NoSuchMethodError}, {@code AbstractMethodError}) in the middle
 * of a task, the first time native memory grows. The plugin runs {@link #verify()} when the
 * driver and each executor start, so such a release fails there, once, with the Spark version and
 * the missing members in the message.
 *
 * <p>The lists below are the members the classes of {@code org.nativemem.spark} link against
 * (fields, methods and constructors of {@code org.apache.spark} classes, as JVM descriptors,
 * including the ones reached through a subclass such as {@link SparkReservationListener}) and the
 * Spark types those classes extend or implement, whose abstract methods must all be implemented.
 * A unit test reads the compiled classes' constant pools and fails when a reference is missing
 * here, and runs this check against every Spark runtime the build tests on.
 */
public final class SparkApiCheck {
    /** One member of a Spark class, as the JVM resolves it: owner, name, descriptor. */
    static final class Member {
        final String owner;
        final String name;
        final String descriptor;

        Member(String owner, String name, String descriptor) {
            this.owner = owner;
            this.name = name;
            this.descriptor = descriptor;
        }

        boolean isMethod() {
            return descriptor.startsWith("(");
        }

        @Override
        public boolean equals(Object o) {
            if (!(o instanceof Member)) {
                return false;
            }
            Member m = (Member) o;
            return owner.equals(m.owner) && name.equals(m.name) && descriptor.equals(m.descriptor);
        }

        @Override
        public int hashCode() {
            return (owner.hashCode() * 31 + name.hashCode()) * 31 + descriptor.hashCode();
        }

        @Override
        public String toString() {
            return owner + (isMethod() ? "." + name + descriptor : "." + name + ":" + descriptor);
        }
    }

    private static Member m(String owner, String name, String descriptor) {
        return new Member(owner, name, descriptor);
    }

    private static final String CONF = "org.apache.spark.SparkConf";
    private static final String TASK = "org.apache.spark.TaskContext";
    private static final String CONSUMER = "org.apache.spark.memory.MemoryConsumer";
    private static final String TMM = "org.apache.spark.memory.TaskMemoryManager";
    private static final String MODE = "Lorg/apache/spark/memory/MemoryMode;";
    private static final String PLUGIN_CTX = "org.apache.spark.api.plugin.PluginContext";
    private static final String STR = "Ljava/lang/String;";

    /** The Spark members the classes of this package link against. */
    static final List<Member> MEMBERS = Collections.unmodifiableList(Arrays.asList(
            m(CONF, "contains", "(" + STR + ")Z"),
            m(CONF, "getAll", "()[Lscala/Tuple2;"),
            m(CONF, "getBoolean", "(" + STR + "Z)Z"),
            m(CONF, "getSizeAsBytes", "(" + STR + STR + ")J"),
            m(CONF, "getSizeAsMb", "(" + STR + STR + ")J"),
            m("org.apache.spark.SparkContext", "getConf", "()Lorg/apache/spark/SparkConf;"),
            m("org.apache.spark.SparkEnv", "conf", "()Lorg/apache/spark/SparkConf;"),
            m("org.apache.spark.SparkEnv", "get", "()Lorg/apache/spark/SparkEnv;"),
            m(TASK, "addTaskCompletionListener",
                    "(Lorg/apache/spark/util/TaskCompletionListener;)Lorg/apache/spark/TaskContext;"),
            m(TASK, "addTaskFailureListener",
                    "(Lorg/apache/spark/util/TaskFailureListener;)Lorg/apache/spark/TaskContext;"),
            m(TASK, "attemptNumber", "()I"),
            m(TASK, "get", "()Lorg/apache/spark/TaskContext;"),
            m(TASK, "isCompleted", "()Z"),
            m(TASK, "isFailed", "()Z"),
            m(TASK, "partitionId", "()I"),
            m(TASK, "stageAttemptNumber", "()I"),
            m(TASK, "stageId", "()I"),
            m(TASK, "taskAttemptId", "()J"),
            m(TASK, "taskMemoryManager", "()Lorg/apache/spark/memory/TaskMemoryManager;"),
            m(TASK, "taskMetrics", "()Lorg/apache/spark/executor/TaskMetrics;"),
            m(PLUGIN_CTX, "conf", "()Lorg/apache/spark/SparkConf;"),
            m(PLUGIN_CTX, "executorID", "()" + STR),
            m(PLUGIN_CTX, "hostname", "()" + STR),
            m(PLUGIN_CTX, "metricRegistry", "()Lcom/codahale/metrics/MetricRegistry;"),
            m(PLUGIN_CTX, "send", "(Ljava/lang/Object;)V"),
            m("org.apache.spark.executor.TaskMetrics", "incPeakExecutionMemory", "(J)V"),
            // NativeTaskMetrics: Spill (Memory) and the task accumulators.
            m("org.apache.spark.executor.TaskMetrics", "incMemoryBytesSpilled", "(J)V"),
            m("org.apache.spark.executor.TaskMetrics", "incDiskBytesSpilled", "(J)V"),
            m("org.apache.spark.util.AccumulatorV2", "<init>", "()V"),
            m("org.apache.spark.util.AccumulatorV2", "register",
                    "(Lorg/apache/spark/SparkContext;Lscala/Option;Z)V"),
            m("org.apache.spark.util.AccumulatorV2", "value", "()Ljava/lang/Object;"),
            m("org.apache.spark.util.LongAccumulator", "<init>", "()V"),
            m("org.apache.spark.util.LongAccumulator", "add", "(J)V"),
            m(CONSUMER, "<init>", "(Lorg/apache/spark/memory/TaskMemoryManager;J" + MODE + ")V"),
            m(CONSUMER, "taskMemoryManager", "Lorg/apache/spark/memory/TaskMemoryManager;"),
            m(CONSUMER, "getMode", "()" + MODE),
            m(CONSUMER, "getUsed", "()J"),
            m("org.apache.spark.memory.MemoryMode", "OFF_HEAP", MODE),
            m("org.apache.spark.memory.MemoryMode", "ON_HEAP", MODE),
            m(TMM, "acquireExecutionMemory", "(JLorg/apache/spark/memory/MemoryConsumer;)J"),
            m(TMM, "releaseExecutionMemory", "(JLorg/apache/spark/memory/MemoryConsumer;)V"),
            m(TMM, "getTungstenMemoryMode", "()" + MODE),
            m(TMM, "pageSizeBytes", "()J"),
            m("org.apache.spark.network.util.JavaUtils", "byteStringAsBytes", "(" + STR + ")J"),
            // SizingPublisher: the sizing answer on the Environment page (Spark's listener bus).
            m("org.apache.spark.SparkContext", "addSparkListener",
                    "(Lorg/apache/spark/scheduler/SparkListenerInterface;)V"),
            m("org.apache.spark.SparkContext", "listenerBus", "()Lorg/apache/spark/scheduler/LiveListenerBus;"),
            m("org.apache.spark.scheduler.LiveListenerBus", "post", "(Lorg/apache/spark/scheduler/SparkListenerEvent;)V"),
            m("org.apache.spark.scheduler.SparkListener", "<init>", "()V"),
            m("org.apache.spark.scheduler.SparkListenerEnvironmentUpdate", "<init>", "(Lscala/collection/Map;)V"),
            m("org.apache.spark.scheduler.SparkListenerEnvironmentUpdate", "environmentDetails",
                    "()Lscala/collection/Map;")));

    /**
     * The classes of this package that extend or implement Spark types: every abstract method those
     * types have in the running Spark must be implemented, or the JVM throws
     * {@code AbstractMethodError} when Spark calls it.
     */
    static final List<String> IMPLEMENTORS = Collections.unmodifiableList(Arrays.asList(
            "org.nativemem.spark.SparkReservationListener",
            "org.nativemem.spark.NativeMemoryPlugin",
            "org.nativemem.spark.NativeMemoryPlugin$Driver",
            "org.nativemem.spark.NativeMemoryPlugin$Executor",
            "org.nativemem.spark.NativeTaskMetrics$MaxLongAccumulator",
            "org.nativemem.spark.SizingPublisher",
            "org.nativemem.spark.TaskNativeMemory$TaskEntry$1", // TaskCompletionListener
            "org.nativemem.spark.TaskNativeMemory$TaskEntry$2")); // TaskFailureListener

    /** The result of the check in this JVM: null before the first call, "" when it passed. */
    private static volatile String verified;

    private SparkApiCheck() {
    }

    /**
     * Checks the Spark of this JVM (the loader of this class), once per JVM.
     *
     * @throws IllegalStateException naming the Spark version and every missing member if this
     *     Spark lacks something nativemem calls
     */
    public static void verify() {
        String result = verified;
        if (result == null) {
            List<String> missing = missing(SparkApiCheck.class.getClassLoader());
            result = missing.isEmpty() ? "" : failure(sparkVersion(SparkApiCheck.class.getClassLoader()), missing);
            verified = result;
        }
        if (!result.isEmpty()) {
            throw new IllegalStateException(result);
        }
    }

    static String failure(String sparkVersion, List<String> missing) {
        return "nativemem does not support Spark " + sparkVersion + ": it needs " + missing.size()
                + " member(s) of Spark's API that this Spark does not have: " + String.join("; ", missing)
                + ". Supported: Spark 3.5.x to 4.3.x (see the support matrix in the README).";
    }

    /**
     * @param loader a class loader that sees Spark (and, for the implementation check, these classes)
     * @return one description per missing member or unimplemented abstract method; empty if this
     *     Spark has everything
     */
    public static List<String> missing(ClassLoader loader) {
        return missing(loader, MEMBERS, IMPLEMENTORS);
    }

    static List<String> missing(ClassLoader loader, List<Member> members, List<String> implementors) {
        List<String> missing = new ArrayList<>();
        for (Member member : members) {
            String why = resolve(loader, member);
            if (why != null) {
                missing.add(member + " (" + why + ")");
            }
        }
        for (String name : implementors) {
            try {
                Class<?> cls = Class.forName(name, false, loader);
                for (Method abstractMethod : unimplemented(cls)) {
                    missing.add(name + " does not implement " + abstractMethod.getDeclaringClass().getName() + "."
                            + abstractMethod.getName() + Arrays.toString(abstractMethod.getParameterTypes()));
                }
            } catch (ClassNotFoundException | LinkageError e) {
                missing.add(name + " cannot be loaded (" + e + ")");
            }
        }
        return missing;
    }

    /**
     * {@link #missing(ClassLoader, List, List)} with each member as {@code "owner name descriptor"},
     * for a check run from a copy of this class that {@code loader} itself loaded: a method-handle
     * lookup from a class of another loader would tie both loaders to one class per name of the
     * signature (a loader constraint), and a later load of that name by the other loader fails.
     */
    static List<String> missingByName(ClassLoader loader, List<String> members, List<String> implementors) {
        List<Member> list = new ArrayList<>();
        for (String member : members) {
            String[] f = member.split(" ");
            list.add(new Member(f[0], f[1], f[2]));
        }
        return missing(loader, list, implementors);
    }

    /**
     * Resolves one member the way the JVM links a call site: through a method handle lookup of
     * that member alone (reflection's {@code getDeclaredMethods} would also resolve every other
     * signature of the class, and fail on types Spark does not ship). A member that exists but is
     * not accessible from this class (protected, reached by our subclasses) still resolves.
     *
     * @return null if {@code member} resolves in {@code loader}, else why not
     */
    private static String resolve(ClassLoader loader, Member member) {
        Class<?> owner;
        try {
            owner = Class.forName(member.owner, false, loader);
        } catch (ClassNotFoundException | LinkageError e) {
            return "class not found";
        }
        MethodHandles.Lookup lookup = MethodHandles.lookup();
        try {
            if (member.isMethod()) {
                MethodType type = MethodType.fromMethodDescriptorString(member.descriptor, loader);
                if (member.name.equals("<init>")) {
                    lookup.findConstructor(owner, type);
                } else {
                    try {
                        lookup.findVirtual(owner, member.name, type);
                    } catch (NoSuchMethodException notVirtual) {
                        lookup.findStatic(owner, member.name, type);
                    }
                }
            } else {
                Class<?> type = MethodType.fromMethodDescriptorString("()" + member.descriptor, loader).returnType();
                try {
                    lookup.findGetter(owner, member.name, type);
                } catch (NoSuchFieldException notInstance) {
                    lookup.findStaticGetter(owner, member.name, type);
                }
            }
            return null;
        } catch (IllegalAccessException exists) {
            return null;
        } catch (NoSuchMethodException e) {
            return member.name.equals("<init>") ? "no such constructor" : "no such method";
        } catch (NoSuchFieldException e) {
            return "no such field" + fieldTypeHere(owner, member.name);
        } catch (TypeNotPresentException | IllegalArgumentException | LinkageError e) {
            return "a type in its signature is missing: " + e.getMessage();
        }
    }

    /** For a field of another type: " of that type: it is a T here", else "". */
    private static String fieldTypeHere(Class<?> owner, String name) {
        for (Class<?> c = owner; c != null; c = c.getSuperclass()) {
            try {
                return " of that type: it is a " + c.getDeclaredField(name).getType().getName() + " here";
            } catch (NoSuchFieldException | LinkageError e) {
                // look further up
            }
        }
        return "";
    }

    /** Abstract methods of {@code cls}'s supertypes that neither it nor a superclass implements. */
    private static List<Method> unimplemented(Class<?> cls) {
        List<Method> result = new ArrayList<>();
        if (Modifier.isAbstract(cls.getModifiers())) {
            return result;
        }
        List<Method> abstractMethods = new ArrayList<>();
        for (Method method : cls.getMethods()) { // public ones, with the interfaces'
            if (Modifier.isAbstract(method.getModifiers())) {
                abstractMethods.add(method);
            }
        }
        for (Class<?> c = cls.getSuperclass(); c != null; c = c.getSuperclass()) {
            for (Method method : c.getDeclaredMethods()) { // protected and package-private ones too
                if (Modifier.isAbstract(method.getModifiers()) && !Modifier.isPublic(method.getModifiers())) {
                    abstractMethods.add(method);
                }
            }
        }
        for (Method method : abstractMethods) {
            if (!implemented(cls, method)) {
                result.add(method);
            }
        }
        return result;
    }

    private static boolean implemented(Class<?> cls, Method method) {
        for (Class<?> c = cls; c != null; c = c.getSuperclass()) {
            for (Method m : c.getDeclaredMethods()) {
                if (!Modifier.isAbstract(m.getModifiers()) && m.getName().equals(method.getName())
                        && Arrays.equals(m.getParameterTypes(), method.getParameterTypes())) {
                    return true;
                }
            }
        }
        return false;
    }

    /**
     * @param loader a class loader that sees Spark
     * @return Spark's version as its own build records it ({@code spark-version-info.properties}),
     *     or {@code "(unknown version)"}
     */
    public static String sparkVersion(ClassLoader loader) {
        try (InputStream in = loader.getResourceAsStream("spark-version-info.properties")) {
            if (in != null) {
                Properties p = new Properties();
                p.load(in);
                String v = p.getProperty("version");
                if (v != null && !v.isEmpty()) {
                    return v;
                }
            }
        } catch (IOException | RuntimeException e) {
            // fall through
        }
        return "(unknown version)";
    }
}
