#!/usr/bin/env bash
# Installs what the build needs, idempotently: Debian gradle + junit4 (+ a JDK / pip if missing),
# chromium (headless, for the Spark UI test tests/spark/spark-ui.sh),
# rustfmt + clippy, and Spark runtimes from the pyspark wheels into .cache/ (git-ignored).
# Quick (about a second) when everything is already there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
mkdir -p "$CACHE"

# The Spark runtimes: scripts/spark-releases.txt, "<minor> <pyspark release> <scope>" per line.
mapfile -t spark_lines < <(sed -e 's/\r$//' -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' "$ROOT/scripts/spark-releases.txt")
spark_ok() { [ -x "$CACHE/$2/pyspark/bin/spark-submit" ] && [ -f "$CACHE/$2/.installed-$1" ]; }
all_spark_ok() {
  local line f
  for line in "${spark_lines[@]}"; do
    read -r -a f <<<"$line"
    spark_ok "${f[1]}" "spark-${f[0]}" || return 1
  done
}

need_apt=()
command -v javac >/dev/null 2>&1 || need_apt+=(openjdk-17-jdk-headless)
command -v gradle >/dev/null 2>&1 || need_apt+=(gradle)
[ -f /usr/share/java/junit4.jar ] || need_apt+=(junit4)
# The Spark UI suite (ui:spark-ui@<v>) renders the stage page in a real browser.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if ! all_spark_ok; then
  python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} from Debian"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found: install Rust (rustup)" >&2; exit 1; }
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    command -v rustup >/dev/null 2>&1 || { echo "setup: cargo $comp missing and no rustup" >&2; exit 1; }
    echo "setup: rustup component add $comp"
    rustup component add "$comp"
  fi
done

install_spark() { # version dir
  local ver="$1" dir="$CACHE/$2"
  spark_ok "$ver" "$2" && return 0
  echo "setup: installing pyspark==$ver into $dir"
  rm -rf "$dir"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir" "pyspark==$ver"
  touch "$dir/.installed-$ver"
}
# Two downloads at a time (each ~400-500 MB unpacked).
rc=0 pids=() installed=()
for line in "${spark_lines[@]}"; do
  read -r -a f <<<"$line"
  install_spark "${f[1]}" "spark-${f[0]}" &
  pids+=($!) installed+=("${f[1]}")
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}" || rc=1; pids=("${pids[@]:1}"); fi
done
for p in ${pids[@]+"${pids[@]}"}; do wait "$p" || rc=1; done
[ $rc -eq 0 ] || { echo "setup: installing Spark failed" >&2; exit 1; }
echo "setup: ok (gradle $(gradle --version 2>/dev/null | awk '/^Gradle/{print $2}'), $(cargo --version | cut -d' ' -f1-2), spark ${installed[*]} in .cache)"
