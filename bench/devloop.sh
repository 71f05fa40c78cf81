#!/usr/bin/env bash
# The dev loop, timed: save -> served for the example plugin and for example-sqlx (axum + sqlx on
# SQLite), each under a host in dev mode (`build` + `watch_paths`) with the `dev-loop` profile.
# Writes bench/devloop.md (the section bench/report.py puts in RESULTS.md).
#
#   bench/run.sh devloop     # this step alone (also run by the whole bench/run.sh)
#   EDITS=5 bench/devloop.sh
#
# Each edit changes the first line `GET /` answers, in the plugin's src/lib.rs (restored on
# exit); "served" is the first answer with the new line. The figure is wall time from the write
# to that answer: debounce, the incremental build, the snapshot and the rollout of a new worker.
# Profile variants are timed by overriding the profile through cargo's environment, e.g.
#   CARGO_PROFILE_DEV_LOOP_OPT_LEVEL=1 bench/devloop.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
EDITS=${EDITS:-3}
PROFILE=${PROFILE:-dev-loop}
PLUGINS=${PLUGINS:-"example-plugin example-sqlx"}
DEBOUNCE=${DEBOUNCE:-100ms}

echo "bench devloop: building host (--release) and the plugins (--profile $PROFILE)" >&2
cargo build --release -q -p host
HOST=$ROOT/target/release/host
WORK=$(mktemp -d)
declare -A ORIG
cleanup() {
  for c in "$WORK"/*.toml; do [ -e "$c" ] && "$HOST" -c "$c" stop >/dev/null 2>&1 || true; done
  for f in "${!ORIG[@]}"; do cp "${ORIG[$f]}" "$f"; done
  rm -rf "$WORK"
}
trap cleanup EXIT

ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
median() { python3 -c 'import sys,statistics; print(int(statistics.median(int(x) for x in sys.argv[1:])))' "$@"; }

ROWS=()
port=18300
for p in $PLUGINS; do
  lib=lib${p//-/_}.so
  src=$ROOT/$p/src/lib.rs
  cp "$src" "$WORK/$p.lib.rs"; ORIG[$src]=$WORK/$p.lib.rs
  build="cd '$ROOT' && cargo build --profile $PROFILE -q -p $p"
  # Warm: the first build (dependencies included) is not what the loop pays on a save.
  (cd "$ROOT" && cargo build --profile "$PROFILE" -q -p "$p")
  port=$((port + 1))
  cat > "$WORK/$p.toml" <<TOML
listen = "127.0.0.1:$port"
workers = 2
plugin = "$ROOT/target/$PROFILE/$lib"
state_dir = "$WORK/state-$p"
build = "$build"
watch_paths = ["$ROOT/$p/src"]
watch_debounce = "$DEBOUNCE"
TOML
  "$HOST" -c "$WORK/$p.toml" start -d >/dev/null 2>"$WORK/$p.start.log"
  times=(); builds=()
  for n in $(seq 1 "$EDITS"); do
    marker="edit-$n-$$"
    t=$(date +%s%N)
    sed -i "s/from $p {VERSION}/from $p {VERSION} $marker/" "$src"
    until curl -s "http://127.0.0.1:$port/" | head -1 | grep -q "$marker"; do
      [ "$(ms_since "$t")" -lt 120000 ] || { echo "bench devloop: $p edit $n not served in 120 s" >&2; exit 1; }
      sleep 0.01
    done
    times+=("$(ms_since "$t")")
    builds+=("$("$HOST" -c "$WORK/$p.toml" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["last_build"]["duration_ms"])')")
    cp "${ORIG[$src]}" "$src"
    # Let the rollout of the restored source pass before the next edit.
    until curl -s "http://127.0.0.1:$port/" | head -1 | grep -vq "edit-"; do sleep 0.05; done
    sleep 1
  done
  "$HOST" -c "$WORK/$p.toml" stop >/dev/null
  echo "bench devloop: $p: save->served ${times[*]} ms; build ${builds[*]} ms" >&2
  ROWS+=("| \`$p\` | $(median "${times[@]}") ms (${times[*]}) | $(median "${builds[@]}") ms |")
done

{
  echo "## 9. Dev loop: save to served"
  echo
  echo "\`bench/run.sh devloop\` ($(date -u +%Y-%m-%d), $(nproc) CPUs, $(rustc --version | cut -d' ' -f1-2)): a host in dev mode"
  echo "(\`build = \"cargo build --profile $PROFILE -p NAME\"\`, \`watch_debounce = \"$DEBOUNCE\"\`, 2 workers);"
  echo "each of $EDITS edits changes the first line of \`GET /\` in \`src/lib.rs\`; the time is from the write to"
  echo "the first answer with the new line. Target: within 3 s. Profile overrides: $(env | grep '^CARGO_PROFILE_' | tr '\n' ' ' | grep . || echo none)."
  echo
  echo "| plugin | save -> served, median (each) | the build in it, median |"
  echo "|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} > "$ROOT/bench/devloop.md"
cat "$ROOT/bench/devloop.md"
