/**
 * nativemem in Spark: one {@link org.nativemem.NativeMemoryManager} per task attempt, budgeted by
 * Spark's own execution memory and closed when the task ends.
 *
 * <pre>
 *  executor JVM
 *  ├─ NativeMemoryPlugin (spark.plugins)     loads the library at start, publishes metrics
 *  └─ task attempt
 *     ├─ TaskNativeMemory.get()  ──creates once──▶ NativeMemoryManager ──handle──▶ native operators
 *     │                                               │ cushion empty: reserve(8 MiB block)
 *     │                                               ▼
 *     ├─ SparkReservationListener (MemoryConsumer) ──acquireExecutionMemory──▶ TaskMemoryManager
 *     │      ▲ spill(n): unused cushion first, then native spillers            │ may spill JVM
 *     │      └──────────────── Spark needs memory for another consumer ◀───────┘ consumers too
 *     ├─ TaskArrowAllocator.get() ──▶ Arrow RootAllocator, buffers charged to the manager's pool
 *     │                                 "arrow" in blocks (org.nativemem.arrow; needs Arrow Java)
 *     └─ task completion listener: close the task's Arrow allocator, then the manager (success,
 *        failure, kill), every byte back to Spark before Spark's leak check; the peak goes into
 *        the task's metrics
 * </pre>
 *
 * <p>Settings: {@link org.nativemem.spark.NativeMemorySparkConf}. Usage:
 * {@link org.nativemem.spark.TaskNativeMemory}, Arrow Java buffers:
 * {@link org.nativemem.spark.TaskArrowAllocator}. Spark accounting:
 * {@link org.nativemem.spark.SparkReservationListener}. Metrics:
 * {@link org.nativemem.spark.NativeMemoryPlugin}. Works on Spark 3.5 and 4.0 (Scala 2.12 and
 * 2.13): only Spark's Java APIs are used.
 */
package org.nativemem.spark;
