package org.nativemem;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.IOException;
import java.io.InputStream;
import java.net.URISyntaxException;
import java.net.URL;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.StandardCopyOption;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashSet;
import java.util.List;
import java.util.Set;
import java.util.concurrent.Callable;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.stream.Stream;
import org.junit.Assume;
import org.junit.Test;

/** Platform names, resource layout, and loading: from many threads, and from several JVMs at once. */
public class NativeLibraryLoaderTest {

    @Test
    public void platformNames() {
        String[][] ok = {
            {"Linux", "amd64", "linux-x86_64"},
            {"Linux", "x86_64", "linux-x86_64"},
            {"Linux", "aarch64", "linux-aarch64"},
            {"Mac OS X", "aarch64", "macos-aarch64"},
            {"Mac OS X", "x86_64", "macos-x86_64"},
            {"Windows 11", "amd64", "windows-x86_64"},
        };
        for (String[] c : ok) {
            assertEquals(c[0] + "/" + c[1], c[2], NativeLibraryLoader.platform(c[0], c[1]));
        }
    }

    @Test
    public void unknownPlatformsFailLoudlyNamingThem() {
        String[][] bad = {
            {"Linux", "ppc64le", "unsupported architecture os.arch=ppc64le on linux"},
            {"Linux", "x86", "unsupported architecture os.arch=x86 on linux"},
            {"Linux", "riscv64", "unsupported architecture os.arch=riscv64 on linux"},
            {"SunOS", "sparcv9", "unsupported operating system os.name=SunOS"},
            {"FreeBSD", "amd64", "unsupported operating system os.name=FreeBSD"},
        };
        for (String[] c : bad) {
            try {
                NativeLibraryLoader.platform(c[0], c[1]);
                fail("accepted " + c[0] + "/" + c[1]);
            } catch (UnsatisfiedLinkError e) {
                assertTrue(e.getMessage(), e.getMessage().startsWith("nativemem: " + c[2]));
                assertTrue(e.getMessage(), e.getMessage().contains("-Dnativemem.library.path=<file>"));
            }
        }
    }

    @Test
    public void resourceLayoutMatchesTheJar() {
        Assume.assumeTrue(System.getProperty("os.name").startsWith("Linux"));
        assertEquals("org/nativemem/native/linux-x86_64/libnativemem_jni.so",
                NativeLibraryLoader.resourcePath("linux-x86_64"));
    }

    @Test
    public void loadFromManyThreadsAtOnce() throws Exception {
        ExecutorService pool = Executors.newFixedThreadPool(16);
        try {
            final CountDownLatch start = new CountDownLatch(1);
            List<Future<Boolean>> results = new ArrayList<Future<Boolean>>();
            for (int i = 0; i < 16; i++) {
                results.add(pool.submit(() -> {
                    start.await();
                    NativeLibraryLoader.load();
                    return NativeLibraryLoader.isLoaded();
                }));
            }
            start.countDown();
            for (Future<Boolean> f : results) {
                assertTrue(f.get(30, TimeUnit.SECONDS));
            }
            assertNotNull(NativeLibraryLoader.loadedFrom());
        } finally {
            pool.shutdownNow();
        }
    }

    @Test
    public void severalJvmsExtractFromTheClasspathConcurrentlyAndLeaveNoFiles() throws Exception {
        Path work = Files.createTempDirectory("nativemem-loader-test");
        try {
            Path jarLike = work.resolve("classpath");
            Path packed = jarLike.resolve(NativeLibraryLoader.resourcePath(NativeLibraryLoader.platform()));
            Files.createDirectories(packed.getParent());
            try (InputStream in = libraryBytes()) {
                Files.copy(in, packed, StandardCopyOption.REPLACE_EXISTING);
            }
            final Path extractTo = work.resolve("extract");
            final String classpath = baseClasspath() + File.pathSeparator + jarLike;
            ExecutorService pool = Executors.newFixedThreadPool(4);
            try {
                List<Future<String>> runs = new ArrayList<Future<String>>();
                for (int i = 0; i < 4; i++) {
                    runs.add(pool.submit((Callable<String>) () -> runProbe(classpath,
                            "-D" + NativeLibraryLoader.TMPDIR_PROPERTY + "=" + extractTo)));
                }
                Set<String> files = new HashSet<String>();
                for (Future<String> run : runs) {
                    String out = run.get(120, TimeUnit.SECONDS);
                    String line = okLine(out);
                    String file = line.substring("ok ".length());
                    assertTrue(out, file.startsWith(extractTo.toString() + File.separator + "libnativemem_jni-"));
                    assertTrue(out, file.endsWith(".so"));
                    files.add(file);
                }
                assertEquals("each JVM extracted its own file", 4, files.size());
            } finally {
                pool.shutdownNow();
            }
            try (Stream<Path> left = Files.list(extractTo)) {
                assertEquals("extracted files are deleted after loading", 0, left.count());
            }
        } finally {
            deleteRecursively(work);
        }
    }

    @Test
    public void missingLibraryNamesThePlatformAndTheResource() throws Exception {
        String base = baseClasspath();
        for (String entry : base.split(File.pathSeparator)) {
            File f = new File(entry, NativeLibraryLoader.resourcePath(NativeLibraryLoader.platform()));
            Assume.assumeTrue("the library is packed next to the classes", !f.exists());
        }
        String out = runProbe(base);
        String platform = NativeLibraryLoader.platform();
        assertTrue(out, out.startsWith("error nativemem: no native library for " + platform + " (os.name="));
        assertTrue(out, out.contains(NativeLibraryLoader.resourcePath(platform) + " is missing from the jar"));
        assertTrue(out, out.contains("-Dnativemem.library.path=<file>"));
    }

    @Test
    public void overrideThatIsNotAFileIsReported() throws Exception {
        String out = runProbe(baseClasspath(), "-Dnativemem.library.path=/nonexistent/libnativemem_jni.so");
        assertTrue(out, out.startsWith(
                "error nativemem: -Dnativemem.library.path=/nonexistent/libnativemem_jni.so is not a file"));
    }

    /** The library of this JVM: from the classpath if packed there, else the override file. */
    private static InputStream libraryBytes() throws IOException {
        URL url = NativeLibraryLoader.class.getResource(
                "/" + NativeLibraryLoader.resourcePath(NativeLibraryLoader.platform()));
        if (url != null) {
            return url.openStream();
        }
        String override = System.getProperty(NativeLibraryLoader.LIBRARY_PATH_PROPERTY);
        Assume.assumeTrue("no library to pack", override != null);
        return Files.newInputStream(Paths.get(override));
    }

    /** Main and test classes only: no library resource, no override. */
    private static String baseClasspath() throws URISyntaxException {
        String main = new File(NativeLibraryLoader.class.getProtectionDomain().getCodeSource().getLocation().toURI())
                .getPath();
        String test = new File(LoaderProbe.class.getProtectionDomain().getCodeSource().getLocation().toURI())
                .getPath();
        return main.equals(test) ? main : main + File.pathSeparator + test;
    }

    private static String runProbe(String classpath, String... props) throws IOException, InterruptedException {
        List<String> cmd = new ArrayList<String>();
        cmd.add(Paths.get(System.getProperty("java.home"), "bin", "java").toString());
        cmd.addAll(Arrays.asList(props));
        cmd.add("-cp");
        cmd.add(classpath);
        cmd.add(LoaderProbe.class.getName());
        ProcessBuilder pb = new ProcessBuilder(cmd).redirectErrorStream(true);
        pb.environment().remove("NATIVEMEM_LOG");
        Process p = pb.start();
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        try (InputStream in = p.getInputStream()) {
            byte[] buf = new byte[8192];
            int n;
            while ((n = in.read(buf)) > 0) {
                out.write(buf, 0, n);
            }
        }
        if (!p.waitFor(120, TimeUnit.SECONDS)) {
            p.destroyForcibly();
            fail("child JVM did not finish: " + cmd);
        }
        return new String(out.toByteArray(), StandardCharsets.UTF_8).trim();
    }

    private static String okLine(String out) {
        for (String line : out.split("\n")) {
            if (line.startsWith("ok ")) {
                return line.trim();
            }
        }
        throw new AssertionError("child JVM failed: " + out);
    }

    private static void deleteRecursively(Path root) throws IOException {
        if (!Files.exists(root)) {
            return;
        }
        try (Stream<Path> paths = Files.walk(root)) {
            Object[] all = paths.sorted((a, b) -> b.getNameCount() - a.getNameCount()).toArray();
            for (Object p : all) {
                Files.deleteIfExists((Path) p);
            }
        }
    }
}
