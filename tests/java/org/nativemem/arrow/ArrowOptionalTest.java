package org.nativemem.arrow;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.File;
import java.io.IOException;
import java.lang.reflect.InvocationTargetException;
import java.net.URL;
import java.net.URLClassLoader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.stream.Stream;

import org.apache.spark.SparkConf;
import org.junit.Test;
import org.nativemem.spark.TaskNativeMemory;

/**
 * nativemem works without Arrow on the classpath as long as the Arrow feature is not used: only
 * {@code org.nativemem.arrow} and {@code org.nativemem.spark.TaskArrowAllocator} refer to Arrow.
 * Checked twice: in the compiled classes (no other class names {@code org/apache/arrow} in its
 * constant pool) and by loading, linking and initializing every other class — and running the
 * plugin's and TaskNativeMemory's Arrow-free paths — in a class loader that has the Spark jars
 * but no Arrow jar.
 */
public class ArrowOptionalTest {
    private static final String ARROW = "org/apache/arrow";

    /** The compiled main classes (build/classes/java/main). */
    private static Path mainClasses() throws Exception {
        return Paths.get(TaskNativeMemory.class.getProtectionDomain().getCodeSource().getLocation().toURI());
    }

    private static boolean usesArrowByDesign(String entry) {
        return entry.startsWith("org/nativemem/arrow/") || entry.startsWith("org/nativemem/spark/TaskArrowAllocator");
    }

    private static List<String> classEntries(Path root) throws IOException {
        List<String> out = new ArrayList<>();
        try (Stream<Path> files = Files.walk(root)) {
            files.filter(p -> p.toString().endsWith(".class"))
                    .forEach(p -> out.add(root.relativize(p).toString().replace(File.separatorChar, '/')));
        }
        Collections.sort(out);
        return out;
    }

    @Test
    public void onlyTheArrowClassesReferToArrow() throws Exception {
        Path root = mainClasses();
        List<String> referring = new ArrayList<>();
        int checked = 0;
        for (String entry : classEntries(root)) {
            // Class names in the constant pool are UTF-8; ASCII names match byte for byte.
            String bytes = new String(Files.readAllBytes(root.resolve(entry)), StandardCharsets.ISO_8859_1);
            boolean refers = bytes.contains(ARROW);
            if (refers && !usesArrowByDesign(entry)) {
                referring.add(entry);
            }
            if (bytes.contains(ARROW) && !bytes.contains(ARROW + "/memory/")) {
                referring.add(entry + " (refers to Arrow outside arrow-memory-core)");
            }
            if (bytes.contains(ARROW + "/vector/")) {
                referring.add(entry + " (refers to arrow-vector: main needs arrow-memory-core only)");
            }
            checked++;
        }
        assertTrue("classes checked: " + checked, checked > 20);
        assertEquals("classes outside org.nativemem.arrow / TaskArrowAllocator that refer to Arrow, or to more"
                + " than arrow-memory-core",
                Collections.<String>emptyList(), referring);
        assertTrue("the listener does refer to Arrow (the check works)",
                new String(Files.readAllBytes(root.resolve("org/nativemem/arrow/NativeAllocationListener.class")),
                        StandardCharsets.ISO_8859_1).contains(ARROW));
    }

    @Test
    public void sparkClassesLoadAndRunWithoutArrow() throws Exception {
        Path root = mainClasses();
        File sparkJars = new File(SparkConf.class.getProtectionDomain().getCodeSource().getLocation().toURI())
                .getParentFile();
        List<URL> urls = new ArrayList<>();
        urls.add(root.toUri().toURL());
        File[] jars = sparkJars.listFiles((dir, name) -> name.endsWith(".jar") && !name.startsWith("arrow-"));
        assertTrue("Spark jars in " + sparkJars, jars != null && jars.length > 50);
        for (File jar : jars) {
            urls.add(jar.toURI().toURL());
        }
        // Parent: the platform loader, so nothing of the test's own class path (with Arrow) leaks in.
        ClassLoader platform = ClassLoader.getSystemClassLoader().getParent();
        try (URLClassLoader loader = new URLClassLoader(urls.toArray(new URL[0]), platform)) {
            try {
                Class.forName("org.apache.arrow.memory.BufferAllocator", false, loader);
                fail("Arrow must be absent from this class loader");
            } catch (ClassNotFoundException expected) {
                // good
            }
            int loaded = 0;
            for (String entry : classEntries(root)) {
                if (usesArrowByDesign(entry) || entry.endsWith("package-info.class")) {
                    continue;
                }
                String name = entry.substring(0, entry.length() - ".class".length()).replace('/', '.');
                Class<?> c = Class.forName(name, true, loader); // links (verifies) and initializes
                c.getDeclaredMethods();
                c.getDeclaredFields();
                c.getDeclaredConstructors();
                loaded++;
            }
            assertTrue("classes loaded: " + loaded, loaded > 20);

            // The plugin and the executor read-outs run; the Arrow gauges read 0.
            Class<?> plugin = Class.forName("org.nativemem.spark.NativeMemoryPlugin", true, loader);
            Object p = plugin.getConstructor().newInstance();
            assertTrue(plugin.getMethod("driverPlugin").invoke(p) != null);
            assertTrue(plugin.getMethod("executorPlugin").invoke(p) != null);
            List<?> names = (List<?>) plugin.getField("METRIC_NAMES").get(null);
            assertTrue(names.toString(), names.contains("arrowAllocatedBytes"));
            Class<?> tnm = Class.forName("org.nativemem.spark.TaskNativeMemory", true, loader);
            Object stats = tnm.getMethod("executorStats").invoke(null);
            assertEquals(0L, stats.getClass().getMethod("arrowAllocatedBytes").invoke(stats));
            assertEquals(0L, stats.getClass().getMethod("arrowAllocators").invoke(stats));
            try {
                tnm.getMethod("get").invoke(null);
                fail("outside a task");
            } catch (InvocationTargetException e) {
                assertTrue(e.getCause().toString(), e.getCause() instanceof IllegalStateException);
            }

            // Only using the Arrow feature needs Arrow.
            try {
                Class<?> taa = Class.forName("org.nativemem.spark.TaskArrowAllocator", true, loader);
                taa.getMethod("get").invoke(null);
                fail("TaskArrowAllocator without Arrow");
            } catch (NoClassDefFoundError e) {
                assertTrue(e.toString(), e.getMessage().contains(ARROW));
            } catch (InvocationTargetException e) {
                assertTrue(e.getCause().toString(), e.getCause() instanceof NoClassDefFoundError
                        && e.getCause().getMessage().contains(ARROW));
            }
        }
    }
}
