#!/usr/bin/env bash
# The container governor against a real kernel memory cgroup and its OOM killer, on one Spark
# release (org.nativemem.e2e.ContainerGovernorJob says what each run asserts):
#
#   tests/spark/container-governor.sh <minor>
#
# Creates two memory cgroups under this process's own (v1 memory controller, or v2 where the
# memory controller is enabled for our subtree), each limited to LIMIT_MIB (default 640), and runs
# the job twice (local-cluster, one executor moved into the cgroup): governor off (the kernel
# OOM-kills the executor), governor on (the job completes, reading a file larger than the limit
# through the page cache causes no pressure). Removes its cgroups and the file afterwards, also
# when a run fails. Needs root; where a cgroup cannot be created it prints SKIP with the reason
# and exits 77 (scripts/test.sh counts it as skipped, not passed).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
version="${1:?usage: tests/spark/container-governor.sh <minor>}"
LIMIT_MIB="${LIMIT_MIB:-640}"
limit=$((LIMIT_MIB << 20))

skip() { echo "SKIP container-governor@$version: $*"; exit 77; }

# ---- our memory cgroup ------------------------------------------------------------------------
base="" kind=""
v1_path="$(awk -F: '$2 ~ /(^|,)memory(,|$)/ {print $3; exit}' /proc/self/cgroup)"
v1_mount="$(awk '$9 == "cgroup" && $NF ~ /(^|,)memory(,|$)/ {print $5; exit}' /proc/self/mountinfo 2>/dev/null)"
if [ -n "$v1_path" ] && [ -n "$v1_mount" ] && [ -d "$v1_mount$v1_path" ]; then
  base="$v1_mount$v1_path" kind=v1
else
  v2_path="$(awk -F: '$1 == "0" {print $3; exit}' /proc/self/cgroup)"
  v2_mount="$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo 2>/dev/null)"
  if [ -n "$v2_path" ] && [ -n "$v2_mount" ] && grep -qw memory "$v2_mount/cgroup.controllers" 2>/dev/null; then
    base="$v2_mount$v2_path" kind=v2
    # Children get the memory controller only if our cgroup delegates it (v2 allows that only in a
    # cgroup without processes of its own, or the root).
    grep -qw memory "$base/cgroup.subtree_control" 2>/dev/null \
      || echo +memory > "$base/cgroup.subtree_control" 2>/dev/null \
      || skip "cgroup v2: cannot enable the memory controller for children of $base (it has processes of its own)"
  fi
fi
[ -n "$base" ] || skip "no memory cgroup controller here (neither v1 nor v2 with memory)"
[ "$(id -u)" = 0 ] || skip "not root: cannot create memory cgroups"

made=()
cleanup() {
  for d in "${made[@]}"; do
    # Anything still inside (an executor that outlived its application) goes back to our cgroup.
    if [ -f "$d/cgroup.procs" ]; then
      while read -r p; do echo "$p" > "$base/cgroup.procs" 2>/dev/null || kill -9 "$p" 2>/dev/null; done < "$d/cgroup.procs"
    fi
    for _ in 1 2 3 4 5; do rmdir "$d" 2>/dev/null && break; sleep 1; done
    [ -d "$d" ] && echo "container-governor: could not remove $d"
  done
  rm -f "$cache_file"
}
cache_file="$(mktemp "${TMPDIR:-/tmp}/nativemem-page-cache-XXXXXX")"
trap cleanup EXIT

new_cgroup() { # name; sets $created
  local d="$base/nativemem-e2e-$$-$1"
  mkdir "$d" 2>/dev/null || skip "cannot create a cgroup under $base ($kind)"
  made+=("$d")
  if [ "$kind" = v1 ]; then
    echo "$limit" > "$d/memory.limit_in_bytes" || skip "cannot set memory.limit_in_bytes in $d"
    echo 0 > "$d/memory.swappiness" 2>/dev/null || true
  else
    echo "$limit" > "$d/memory.max" || skip "cannot set memory.max in $d"
    echo 0 > "$d/memory.swap.max" 2>/dev/null || true
  fi
  created="$d"
}

new_cgroup off; off="$created"
new_cgroup on; on="$created"
echo "container-governor: cgroup $kind under $base, limit $LIMIT_MIB MiB: $off, $on"

# A file larger than the limit, for the page-cache check (written outside the cgroups).
dd if=/dev/zero of="$cache_file" bs=1M count=$((LIMIT_MIB + 256)) status=none

submit() { # governor-enabled cgroup expect [app args...]
  local enabled="$1" dir="$2" expect="$3"; shift 3
  bash scripts/spark-submit.sh "$version" --master 'local-cluster[1,1,1024]' \
    --conf spark.plugins=org.nativemem.spark.NativeMemoryPlugin \
    --conf spark.memory.offHeap.enabled=true --conf spark.memory.offHeap.size=6g \
    --conf spark.nativemem.reservationBlockSize=8m \
    --conf spark.nativemem.governor.enabled="$enabled" \
    --conf spark.task.maxFailures=1 \
    --class org.nativemem.e2e.ContainerGovernorJob build/libs/nativemem-e2e.jar \
    --cgroup "$dir" --limit "$limit" --expect "$expect" "$@"
}

rc=0
echo "--- governor off: the kernel must OOM-kill the executor"
submit false "$off" oom || rc=1
echo "--- governor on: the job must complete"
submit true "$on" success --page-cache-file "$cache_file" || rc=1
exit $rc
