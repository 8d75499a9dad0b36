/**
 * An engine in its own native library, usable from Java and Spark: {@link
 * org.nativemem.examples.NativeSorter}, a spilling external sort of {@code long} keys whose buffer
 * lives in native memory charged to a task's {@link org.nativemem.NativeMemoryManager}.
 *
 * <pre>
 *  task ── NativeSorter.insert(long[]) ──JNI──▶ libnativemem_examples.so: ExternalSorter (Rust)
 *                                                 │ engine ABI (nativeApi(), handle()), a lease per call
 *                                                 │ 1 MiB chunks from the manager's pool "sort"
 *                                                 │ refused / Spark asks ──▶ sorted run on disk
 *          NativeSorter.sorted() ◀──batches──── k-way merge of chunks + runs
 * </pre>
 *
 * These classes and {@code libnativemem_examples} ship in {@code nativemem-examples.jar}, apart
 * from {@code nativemem.jar} (which they need on the same class loader, e.g. both on Spark's
 * {@code --jars}).
 *
 * The Spark job {@code org.nativemem.examples.SortJob} (in the e2e jar, run by
 * {@code scripts/run-example.sh}) sorts random keys with it in every task.
 */
package org.nativemem.examples;
