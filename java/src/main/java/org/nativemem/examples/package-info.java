/**
 * Native operators built on nativemem, usable from Java and Spark: {@link
 * org.nativemem.examples.NativeSorter}, a spilling external sort of {@code long} keys whose buffer
 * lives in native memory charged to a task's {@link org.nativemem.NativeMemoryManager}.
 *
 * <pre>
 *  task ── NativeSorter.insert(long[]) ──JNI──▶ ExternalSorter (Rust, nativemem-examples)
 *                                                 │ 1 MiB chunks from the manager's pool "sort"
 *                                                 │ refused / Spark asks ──▶ sorted run on disk
 *          NativeSorter.sorted() ◀──batches──── k-way merge of chunks + runs
 * </pre>
 *
 * The Spark job {@code org.nativemem.examples.SortJob} (in the e2e jar, run by
 * {@code scripts/run-example.sh}) sorts random keys with it in every task.
 */
package org.nativemem.examples;
