package org.nativemem.spark;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.DataInputStream;
import java.io.File;
import java.io.FileInputStream;
import java.io.IOException;
import java.net.URL;
import java.net.URLClassLoader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;

import org.junit.Test;

/**
 * One jar for every supported Spark: {@link SparkApiCheck} lists every member of Spark's API the
 * classes of nativemem.jar link against, and each supported Spark runtime has them all.
 *
 * <ul>
 *   <li>Completeness: the compiled classes of {@code org.nativemem} (what nativemem.jar ships) are
 *       read as class files; every field, method and constructor reference whose declaring class
 *       is a Spark class (directly, or inherited through one of ours such as
 *       {@code SparkReservationListener.acquireMemory}) must be in {@link SparkApiCheck#MEMBERS},
 *       and every class of ours extending or implementing a Spark type in
 *       {@link SparkApiCheck#IMPLEMENTORS}. A new call into Spark that is not listed fails here.</li>
 *   <li>The matrix: for each release of {@code scripts/spark-releases.txt}, a class loader over that
 *       runtime's jars (installed by {@code scripts/setup.sh}) and our classes resolves every listed
 *       member, and our classes implement every abstract method of their Spark supertypes.</li>
 *   <li>The e2e jobs and example engines: every Spark member they link against exists in every
 *       release. Arrow Java (Spark's, 12.0.1 to 19.0.0): every Arrow member {@code org.nativemem.arrow}
 *       links against exists, and its Arrow implementations lack no abstract method, on every release.</li>
 *   <li>The check fails, naming the version: the {@code used} field as a {@code long} (what nativemem
 *       read up to 0.x) is reported missing on Spark 4.2 and later.</li>
 * </ul>
 */
public class SparkApiCheckTest {
    private static final File ROOT = new File(System.getProperty("nativemem.projectDir", "."));

    /** minor release -> pyspark release, from scripts/spark-releases.txt. */
    private static Map<String, String> releases() throws IOException {
        Map<String, String> releases = new LinkedHashMap<>();
        for (String line : Files.readAllLines(new File(ROOT, "scripts/spark-releases.txt").toPath(),
                StandardCharsets.UTF_8)) {
            String t = line.trim();
            if (t.isEmpty() || t.startsWith("#")) {
                continue;
            }
            String[] f = t.split("\\s+");
            releases.put(f[0], f[1]);
        }
        return releases;
    }

    private static File mainClasses() throws Exception {
        return new File(SparkApiCheck.class.getProtectionDomain().getCodeSource().getLocation().toURI());
    }

    /** A loader over one Spark runtime's jars and our compiled classes, nothing of the test's classpath. */
    private static URLClassLoader sparkLoader(String minor) throws Exception {
        File jars = new File(ROOT, ".cache/spark-" + minor + "/pyspark/jars");
        File[] files = jars.listFiles((d, n) -> n.endsWith(".jar"));
        if (files == null || files.length == 0) {
            fail("Spark " + minor + " is not installed at " + jars + ": run scripts/setup.sh");
        }
        Arrays.sort(files);
        List<URL> urls = new ArrayList<>();
        urls.add(mainClasses().toURI().toURL());
        for (File f : files) {
            urls.add(f.toURI().toURL());
        }
        return new URLClassLoader(urls.toArray(new URL[0]), ClassLoader.getSystemClassLoader().getParent());
    }

    /**
     * Runs the check with the copy of {@link SparkApiCheck} that {@code loader} loads (see
     * {@code SparkApiCheck.missingByName}): nothing of that Spark's classes ever meets this
     * test JVM's own Spark and Arrow classes.
     */
    private static List<String> check(ClassLoader loader, java.util.Collection<SparkApiCheck.Member> members,
            List<String> implementors) throws Exception {
        List<String> names = new ArrayList<>();
        for (SparkApiCheck.Member m : members) {
            names.add(m.owner + " " + m.name + " " + m.descriptor);
        }
        Class<?> check = Class.forName(SparkApiCheck.class.getName(), true, loader);
        if (check == SparkApiCheck.class) {
            throw new AssertionError("the check must come from " + loader);
        }
        java.lang.reflect.Method method = check.getDeclaredMethod("missingByName", ClassLoader.class, List.class,
                List.class);
        method.setAccessible(true);
        @SuppressWarnings("unchecked")
        List<String> missing = (List<String>) method.invoke(null, loader, names, implementors);
        return missing;
    }

    private static List<String> check(ClassLoader loader) throws Exception {
        return check(loader, SparkApiCheck.MEMBERS, SparkApiCheck.IMPLEMENTORS);
    }

    // ---- completeness ---------------------------------------------------------------------------

    /** A class file's references to members of other classes, and its supertypes. */
    private static final class ClassRefs {
        final String name;
        final List<String> supertypes = new ArrayList<>();
        final List<SparkApiCheck.Member> refs = new ArrayList<>();

        ClassRefs(String name) {
            this.name = name;
        }
    }

    /** Reads the constant pool (JVMS 4.4) and the super class / interfaces of a class file. */
    private static ClassRefs read(File file) throws IOException {
        try (DataInputStream in = new DataInputStream(new FileInputStream(file))) {
            if (in.readInt() != 0xCAFEBABE) {
                throw new IOException("not a class file: " + file);
            }
            in.readUnsignedShort();
            in.readUnsignedShort();
            int count = in.readUnsignedShort();
            Object[] pool = new Object[count];
            int[][] pairs = new int[count][];
            int[] tags = new int[count];
            for (int i = 1; i < count; i++) {
                int tag = in.readUnsignedByte();
                tags[i] = tag;
                switch (tag) {
                    case 1: pool[i] = in.readUTF(); break;
                    case 3: case 4: in.readInt(); break;
                    case 5: case 6: in.readLong(); i++; break;
                    case 7: case 8: case 16: case 19: case 20: pairs[i] = new int[] {in.readUnsignedShort()}; break;
                    case 9: case 10: case 11: case 12: case 17: case 18:
                        pairs[i] = new int[] {in.readUnsignedShort(), in.readUnsignedShort()};
                        break;
                    case 15: in.readUnsignedByte(); pairs[i] = new int[] {in.readUnsignedShort()}; break;
                    default: throw new IOException("constant pool tag " + tag + " in " + file);
                }
            }
            in.readUnsignedShort(); // access
            ClassRefs refs = new ClassRefs(className(pool, pairs, in.readUnsignedShort()));
            int superIndex = in.readUnsignedShort();
            if (superIndex != 0) {
                refs.supertypes.add(className(pool, pairs, superIndex));
            }
            int interfaces = in.readUnsignedShort();
            for (int i = 0; i < interfaces; i++) {
                refs.supertypes.add(className(pool, pairs, in.readUnsignedShort()));
            }
            for (int i = 1; i < count; i++) {
                if (tags[i] == 9 || tags[i] == 10 || tags[i] == 11) {
                    String owner = className(pool, pairs, pairs[i][0]);
                    int[] nat = pairs[pairs[i][1]];
                    refs.refs.add(new SparkApiCheck.Member(owner, (String) pool[nat[0]], (String) pool[nat[1]]));
                }
            }
            return refs;
        }
    }

    private static String className(Object[] pool, int[][] pairs, int classIndex) {
        return ((String) pool[pairs[classIndex][0]]).replace('/', '.');
    }

    private static void classFiles(File dir, List<File> out) {
        File[] files = dir.listFiles();
        if (files == null) {
            return;
        }
        for (File f : files) {
            if (f.isDirectory()) {
                classFiles(f, out);
            } else if (f.getName().endsWith(".class")) {
                out.add(f);
            }
        }
    }

    /** The class that declares {@code member} as the JVM would find it from {@code owner}, or null. */
    private static String declaringClass(Class<?> owner, SparkApiCheck.Member member) {
        List<Class<?>> todo = new ArrayList<>(Collections.singletonList(owner));
        Set<Class<?>> seen = new LinkedHashSet<>();
        while (!todo.isEmpty()) {
            Class<?> c = todo.remove(0);
            if (c == null || !seen.add(c)) {
                continue;
            }
            if (member.isMethod()) {
                for (java.lang.reflect.Method m : c.getDeclaredMethods()) {
                    if (m.getName().equals(member.name) && descriptor(m).equals(member.descriptor)) {
                        return c.getName();
                    }
                }
                if (member.name.equals("<init>")) {
                    return c.getName();
                }
            } else {
                for (java.lang.reflect.Field f : c.getDeclaredFields()) {
                    if (f.getName().equals(member.name)) {
                        return c.getName();
                    }
                }
            }
            todo.add(c.getSuperclass());
            todo.addAll(Arrays.asList(c.getInterfaces()));
        }
        return null;
    }

    private static String descriptor(java.lang.reflect.Method m) {
        StringBuilder sb = new StringBuilder("(");
        for (Class<?> p : m.getParameterTypes()) {
            sb.append(typeDescriptor(p));
        }
        return sb.append(')').append(typeDescriptor(m.getReturnType())).toString();
    }

    private static String typeDescriptor(Class<?> c) {
        if (c.isArray()) {
            return c.getName().replace('.', '/');
        }
        if (c.isPrimitive()) {
            if (c == void.class) return "V";
            if (c == boolean.class) return "Z";
            if (c == byte.class) return "B";
            if (c == char.class) return "C";
            if (c == short.class) return "S";
            if (c == int.class) return "I";
            if (c == long.class) return "J";
            if (c == float.class) return "F";
            return "D";
        }
        return "L" + c.getName().replace('.', '/') + ";";
    }

    private static boolean isSpark(String className) {
        return className.startsWith("org.apache.spark.");
    }

    /** The Spark members the classes under {@code dir} link against (see the class docs). */
    private static Set<SparkApiCheck.Member> sparkRefs(File dir, ClassLoader loader, Set<String> implementors,
            Map<SparkApiCheck.Member, String> from) throws Exception {
        return refs(dir, loader, "org.apache.spark.", implementors, from);
    }

    /** The members of classes under {@code prefix} that the classes under {@code dir} link against. */
    private static Set<SparkApiCheck.Member> refs(File dir, ClassLoader loader, String prefix, Set<String> implementors,
            Map<SparkApiCheck.Member, String> from) throws Exception {
        List<File> files = new ArrayList<>();
        classFiles(dir, files);
        assertTrue("no classes under " + dir, files.size() > 3);
        Set<SparkApiCheck.Member> members = new LinkedHashSet<>();
        for (File file : files) {
            ClassRefs refs = read(file);
            for (String supertype : refs.supertypes) {
                if (supertype.startsWith(prefix)) {
                    implementors.add(refs.name);
                }
            }
            for (SparkApiCheck.Member ref : refs.refs) {
                String declaring;
                if (ref.owner.startsWith(prefix)) {
                    declaring = ref.owner;
                } else if (ref.owner.startsWith("org.nativemem.")) {
                    String d = declaringClass(Class.forName(ref.owner, false, loader), ref);
                    if (d == null || !d.startsWith(prefix)) {
                        continue;
                    }
                    declaring = d;
                } else {
                    continue;
                }
                SparkApiCheck.Member member = new SparkApiCheck.Member(declaring, ref.name, ref.descriptor);
                members.add(member);
                from.putIfAbsent(member, refs.name);
            }
        }
        return members;
    }

    @Test
    public void everySparkMemberNativememCallsIsListed() throws Exception {
        Set<String> implementors = new TreeSet<>();
        Map<SparkApiCheck.Member, String> from = new LinkedHashMap<>();
        // Our classes + Spark 3.5 (what they are compiled against).
        Set<SparkApiCheck.Member> members = sparkRefs(mainClasses(), SparkApiCheck.class.getClassLoader(),
                implementors, from);
        Set<String> unlisted = new TreeSet<>();
        for (SparkApiCheck.Member member : members) {
            if (!SparkApiCheck.MEMBERS.contains(member)) {
                unlisted.add(member + " (from " + from.get(member) + ")");
            }
        }
        System.out.println("SparkApiCheck: " + members.size() + " Spark members referenced by nativemem.jar's classes, "
                + SparkApiCheck.MEMBERS.size() + " listed, implementors " + implementors);
        assertTrue("Spark members called by nativemem but missing from SparkApiCheck.MEMBERS: " + unlisted,
                unlisted.isEmpty());
        assertEquals("classes extending or implementing Spark types (SparkApiCheck.IMPLEMENTORS)",
                new TreeSet<>(SparkApiCheck.IMPLEMENTORS), implementors);
    }

    /**
     * The end-to-end jobs and the example engines run on every release too (compiled against the
     * oldest): each Spark member they link against must exist in each runtime, or a job fails
     * there with a LinkageError (as reading {@code MemoryConsumer.used} did on 4.2).
     */
    @Test
    public void everySparkMemberTheJobsAndExamplesCallExistsInEverySpark() throws Exception {
        File build = mainClasses().getParentFile();
        File[] dirs = {new File(build, "e2e"), new File(build, "examples")};
        Set<SparkApiCheck.Member> members = new LinkedHashSet<>();
        Map<SparkApiCheck.Member, String> from = new LinkedHashMap<>();
        try (URLClassLoader spark = sparkLoader("3.5");
             URLClassLoader loader = new URLClassLoader(
                     new URL[] {dirs[0].toURI().toURL(), dirs[1].toURI().toURL()}, spark)) {
            for (File dir : dirs) {
                members.addAll(sparkRefs(dir, loader, new TreeSet<String>(), from));
            }
        }
        List<String> failures = new ArrayList<>();
        for (String minor : releases().keySet()) {
            try (URLClassLoader loader = sparkLoader(minor)) {
                List<String> missing = check(loader, members, Collections.<String>emptyList());
                System.out.println("SparkApiCheck: jobs and examples on Spark " + SparkApiCheck.sparkVersion(loader)
                        + ": " + members.size() + " members, " + missing.size() + " missing");
                for (String m : missing) {
                    failures.add("Spark " + minor + ": " + m);
                }
            }
        }
        assertTrue("Spark members the e2e jobs or examples call that a supported Spark lacks: " + failures
                + " (from " + from + ")", failures.isEmpty());
    }

    /**
     * Arrow Java comes from Spark (12.0.1 in 3.5 to 19.0.0 in 4.3) and {@code org.nativemem.arrow}
     * is compiled against the oldest: every Arrow member it links against must exist in the Arrow
     * of every supported release.
     */
    @Test
    public void everyArrowMemberNativememCallsExistsInEverySparksArrow() throws Exception {
        Map<SparkApiCheck.Member, String> from = new LinkedHashMap<>();
        Set<String> implementors = new TreeSet<>();
        Set<SparkApiCheck.Member> members = refs(mainClasses(), SparkApiCheck.class.getClassLoader(),
                "org.apache.arrow.", implementors, from);
        assertTrue("org.nativemem.arrow calls Arrow: " + members, members.size() > 5);
        assertTrue("org.nativemem.arrow implements Arrow types: " + implementors, !implementors.isEmpty());
        List<String> failures = new ArrayList<>();
        for (String minor : releases().keySet()) {
            try (URLClassLoader loader = sparkLoader(minor)) {
                List<String> missing = check(loader, members, new ArrayList<>(implementors));
                System.out.println("SparkApiCheck: Arrow of Spark " + SparkApiCheck.sparkVersion(loader) + ": "
                        + members.size() + " members, " + implementors.size() + " implementors, " + missing.size()
                        + " missing");
                for (String m : missing) {
                    failures.add("Spark " + minor + ": " + m);
                }
            }
        }
        assertTrue("Arrow members nativemem calls that a supported Spark's Arrow lacks: " + failures, failures.isEmpty());
    }

    @Test
    public void everySupportedSparkHasWhatNativememCalls() throws Exception {
        Map<String, String> releases = releases();
        assertTrue("scripts/spark-releases.txt lists " + releases.keySet(), releases.size() >= 5);
        List<String> failures = new ArrayList<>();
        for (Map.Entry<String, String> release : releases.entrySet()) {
            try (URLClassLoader loader = sparkLoader(release.getKey())) {
                String version = SparkApiCheck.sparkVersion(loader);
                assertEquals("the runtime installed for Spark " + release.getKey(), release.getValue(), version);
                List<String> missing = check(loader);
                System.out.println("SparkApiCheck: Spark " + version + ": " + SparkApiCheck.MEMBERS.size()
                        + " members, " + SparkApiCheck.IMPLEMENTORS.size() + " implementors, "
                        + missing.size() + " missing" + (missing.isEmpty() ? "" : ": " + missing));
                if (!missing.isEmpty()) {
                    failures.add(SparkApiCheck.failure(version, missing));
                }
            }
        }
        assertTrue(String.join("\n", failures), failures.isEmpty());
    }

    @Test
    public void aMissingMemberFailsNamingTheSparkVersion() throws Exception {
        // What nativemem linked against before: MemoryConsumer.used as a long field. Present up to
        // 4.1, an AtomicLong from 4.2.
        List<SparkApiCheck.Member> oldField = Collections.singletonList(
                new SparkApiCheck.Member("org.apache.spark.memory.MemoryConsumer", "used", "J"));
        List<SparkApiCheck.Member> gone = Collections.singletonList(
                new SparkApiCheck.Member("org.apache.spark.memory.TaskMemoryManager", "acquireNothing", "(J)J"));
        for (String minor : releases().keySet()) {
            try (URLClassLoader loader = sparkLoader(minor)) {
                String version = SparkApiCheck.sparkVersion(loader);
                List<String> missing = check(loader, oldField, Collections.<String>emptyList());
                boolean atomic = minor.compareTo("4.2") >= 0;
                assertEquals("Spark " + version + ": " + missing, atomic ? 1 : 0, missing.size());
                if (atomic) {
                    assertTrue(missing.get(0), missing.get(0).contains("it is a java.util.concurrent.atomic.AtomicLong here"));
                }
                List<String> none = check(loader, gone, Collections.<String>emptyList());
                assertEquals(1, none.size());
                String message = SparkApiCheck.failure(version, none);
                assertTrue(message, message.contains("Spark " + version)
                        && message.contains("TaskMemoryManager.acquireNothing(J)J (no such method)"));
            }
        }
    }

    @Test
    public void aClassMissingAnAbstractMethodIsReported() throws Exception {
        // A concrete class "extends MemoryConsumer" without spill(long, MemoryConsumer), as a Spark
        // release that added an abstract method would leave SparkReservationListener (javac would
        // refuse to compile it, so its class file is written here): it must be reported, where the
        // JVM would throw AbstractMethodError when Spark calls it.
        try (URLClassLoader spark = sparkLoader("3.5")) {
            String name = "org.nativemem.spark.NoSpill";
            byte[] bytes = emptySubclass(name, "org.apache.spark.memory.MemoryConsumer");
            ClassLoader loader = new ClassLoader(spark) {
                @Override
                protected Class<?> findClass(String n) throws ClassNotFoundException {
                    if (n.equals(name)) {
                        return defineClass(n, bytes, 0, bytes.length);
                    }
                    throw new ClassNotFoundException(n);
                }
            };
            List<String> missing = check(loader, Collections.<SparkApiCheck.Member>emptyList(),
                    Collections.singletonList(name));
            assertEquals(missing.toString(), 1, missing.size());
            assertTrue(missing.get(0),
                    missing.get(0).contains("does not implement org.apache.spark.memory.MemoryConsumer.spill"));
            assertTrue(check(spark, Collections.<SparkApiCheck.Member>emptyList(),
                    Collections.singletonList("org.nativemem.spark.SparkReservationListener")).isEmpty());
        }
    }

    /** A minimal class file (version 52): public class {@code name} extends {@code superName}, no members. */
    private static byte[] emptySubclass(String name, String superName) throws IOException {
        java.io.ByteArrayOutputStream bytes = new java.io.ByteArrayOutputStream();
        java.io.DataOutputStream out = new java.io.DataOutputStream(bytes);
        out.writeInt(0xCAFEBABE);
        out.writeShort(0);
        out.writeShort(52);
        out.writeShort(5); // constant pool count: 4 entries
        out.writeByte(1);
        out.writeUTF(name.replace('.', '/'));
        out.writeByte(7);
        out.writeShort(1);
        out.writeByte(1);
        out.writeUTF(superName.replace('.', '/'));
        out.writeByte(7);
        out.writeShort(3);
        out.writeShort(0x0021); // ACC_PUBLIC | ACC_SUPER
        out.writeShort(2);
        out.writeShort(4);
        out.writeShort(0); // interfaces
        out.writeShort(0); // fields
        out.writeShort(0); // methods
        out.writeShort(0); // attributes
        return bytes.toByteArray();
    }
}
