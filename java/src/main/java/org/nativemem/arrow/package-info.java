/**
 * Arrow Java buffers on a nativemem budget: Arrow's off-heap memory counts in the same pools,
 * limits and spill as native memory.
 *
 * <pre>
 *  Arrow vectors ──buffer(n)──▶ RootAllocator (per task) ──onPreAllocation(n)──▶ NativeAllocationListener
 *                                  │ memory: tracked system allocations            │ cushion short?
 *                                  │ (NativeArrowAllocator frees leaks at close)   ▼ grow by whole blocks (JNI)
 *                                  │                                  NativeReservation in pool "arrow"
 *                                  ▼                                               │
 *                           Arrow OutOfMemoryException  ◀── refused after spill ── NativeMemoryManager ──▶ Spark
 * </pre>
 *
 * <ul>
 *   <li>{@link org.nativemem.arrow.NativeAllocationListener}: the {@code AllocationListener}, for
 *       any {@code RootAllocator}.
 *   <li>{@link org.nativemem.arrow.NativeArrowAllocator}: a root allocator with that listener
 *       whose close frees leaked buffers and reports them with Arrow's own text.
 *   <li>In Spark: {@code org.nativemem.spark.TaskArrowAllocator.get()}, the current task's
 *       allocator, closed at task end before the task's native manager.
 * </ul>
 *
 * <p>Compiled against the Arrow Java that Spark ships ({@code arrow-memory-core} 12.0.1 in
 * Spark 3.5, 18.1.0 in Spark 4.0; the same {@code AllocationListener}), and never bundled: these
 * classes need Arrow on the classpath, nothing else in nativemem does.
 */
package org.nativemem.arrow;
