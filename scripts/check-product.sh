#!/usr/bin/env bash
# Checks that what a user deploys carries only the product (run by scripts/test.sh after gradle):
#   - target/release/libnativemem_jni.so exports JNI_OnLoad, the Java_* methods of the public
#     org.nativemem classes, and the engine ABI's C symbol; nothing else (no test hooks, bench
#     harness or example operators);
#   - the library needs no static TLS (DT_FLAGS STATIC_TLS: initial-exec thread-locals), which a
#     library the JVM loads with dlopen takes from glibc's small surplus (a few hundred bytes
#     shared by every such library) and fails to load without ("cannot allocate memory in static
#     TLS block");
#   - build/libs/nativemem.jar holds classes of org.nativemem, org.nativemem.spark and
#     org.nativemem.arrow only (no Arrow classes: Spark provides them), and the native library of
#     its platform.
# Prints every offending entry and exits non-zero if there is one.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lib="${1:-${CARGO_TARGET_DIR:-$ROOT/target}/release/libnativemem_jni.so}"
jar="${2:-$ROOT/build/libs/nativemem.jar}"
rc=0

# ---- exported symbols ------------------------------------------------------------------------------
allowed='^(JNI_OnLoad|nativemem_api|Java_org_nativemem_(NativeLibraryLoader|NativeMemoryManager|NativeReservation|ContainerGovernor|ExecutorArbiter)_native[A-Za-z]+)$'
if [ ! -f "$lib" ]; then
  echo "check-product: $lib missing (cargo build --release -p nativemem-jni)"; exit 1
fi
exports="$(nm -D --defined-only "$lib" | awk 'NF >= 3 && $2 ~ /^[TtWwDdBbRrVvi]$/ { print $3 }' | sort -u)"
bad="$(grep -Ev "$allowed" <<<"$exports" || true)"
n="$(grep -c . <<<"$exports")"
if [ -n "$bad" ]; then
  echo "check-product: $lib exports symbols outside the allow-list:"; sed 's/^/  /' <<<"$bad"; rc=1
else
  echo "check-product: $lib: $n exports, all in the allow-list"
fi
for must in JNI_OnLoad nativemem_api Java_org_nativemem_NativeMemoryManager_nativeApiAddress; do
  grep -qx "$must" <<<"$exports" || { echo "check-product: $lib does not export $must"; rc=1; }
done

# ---- static TLS -------------------------------------------------------------------------------------
if readelf -d "$lib" | grep -q STATIC_TLS; then
  echo "check-product: $lib needs static TLS (initial-exec thread-locals): dlopen may fail with 'cannot allocate memory in static TLS block'"
  readelf -d "$lib" | grep FLAGS | sed 's/^/  /'; rc=1
else
  echo "check-product: $lib: no static TLS"
fi

# ---- jar contents ----------------------------------------------------------------------------------
if [ ! -f "$jar" ]; then
  echo "check-product: $jar missing (gradle assemble)"; exit 1
fi
entries="$(unzip -Z1 "$jar")"
bad="$(grep -Ev '^(META-INF/|org/$|org/nativemem/$|org/nativemem/[A-Za-z0-9_$]+\.class$|org/nativemem/spark/$|org/nativemem/spark/[A-Za-z0-9_$]+\.class$|org/nativemem/arrow/$|org/nativemem/arrow/[A-Za-z0-9_$]+\.class$|org/nativemem/native/$|org/nativemem/native/[a-z0-9_]+-[a-z0-9_]+/$|org/nativemem/native/[a-z0-9_]+-[a-z0-9_]+/libnativemem_jni\.so$)' <<<"$entries" || true)"
if [ -n "$bad" ]; then
  echo "check-product: $jar holds entries outside org.nativemem / org.nativemem.spark / org.nativemem.arrow:"; sed 's/^/  /' <<<"$bad"; rc=1
else
  echo "check-product: $jar: $(grep -c '\.class$' <<<"$entries") classes, all in org.nativemem, org.nativemem.spark and org.nativemem.arrow"
fi
for cls in NativeTesting NativeBench; do
  if grep -q "/$cls\.class$" <<<"$entries"; then echo "check-product: $jar contains $cls"; rc=1; fi
done
exit $rc
