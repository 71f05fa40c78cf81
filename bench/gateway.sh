#!/usr/bin/env bash
# The gateway's targets (issue 21), run only when asked, never by `bench/run.sh` alone:
#
#   bench/run.sh gateway                  # all four parts: reload cpu fanout idle
#   bench/run.sh gateway reload fanout    # some of them
#
# Sizes (the issue's by default): CLIENTS=10000 echo clients through RELOADS=5 business reloads,
# FANOUT=10000 members of the room a `say` goes to, IDLE=100000 idle connections. The chat example
# (`example-chat/`) is the business plugin, 2 workers; the tools are `gateway-bench` subcommands
# (bench/src/bin/gateway-bench.rs). Release builds. Prints the figures; bench/MEASURED.md keeps
# the ones taken, with the command. Needs python3 and /proc.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PARTS=${*:-reload cpu fanout idle}
CLIENTS=${CLIENTS:-10000}
RELOADS=${RELOADS:-5}
FANOUT=${FANOUT:-10000}
IDLE=${IDLE:-100000}
SOURCES=127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8

echo "gateway bench: building (--release)" >&2
cargo build --release -q -p host -p example-chat -p bench
BIN=$ROOT/target/release
TOOL=$BIN/gateway-bench
WORK=$(mktemp -d)
KILL=()
cleanup() {
  for p in "${KILL[@]}"; do kill "$p" 2>/dev/null || true; done
  for c in "$WORK"/*.toml; do [ -e "$c" ] && "$BIN/host" -c "$c" stop >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
install -m 644 "$BIN/libexample_chat.so" "$WORK/chat.so"

# Every process gets the hard fd limit; one gateway process holds at most that many clients
# (less a margin), so more clients need more gateway processes, and more client processes.
ulimit -n "$(ulimit -Hn)"
PER_PROC=$(( $(ulimit -n) - 256 ))
procs_for() { echo $(( ($1 + PER_PROC - 1) / PER_PROC )); }

chat_config() { # name gateway_processes [more gateway keys]
  cat > "$WORK/$1.toml" <<TOML
state_dir = "state-$1"
canary_workers = 0
[[group]]
name = "chat"
listen = "127.0.0.1:18281"
workers = 2
plugin = "chat.so"
[[group]]
name = "gw"
gateway = true
business = "chat"
listen = "127.0.0.1:18282"
workers = $2
gateway_max_clients = $PER_PROC
${3:-}
TOML
  "$BIN/host" -c "$WORK/$1.toml" start -d >/dev/null
}
stop_chat() { "$BIN/host" -c "$WORK/$1.toml" stop >/dev/null; }
pids_of() { # name [group]: the pids of the master and every worker, or of one group's workers
  "$BIN/host" -c "$WORK/$1.toml" status --json | python3 -c '
import json, sys
s, group = json.load(sys.stdin), sys.argv[1]
if group:
    print(*[w["pid"] for g in s["groups"] if g["group"] == group for w in g["workers"]])
else:
    print(s["master_pid"], *[w["pid"] for g in s["groups"] for w in g["workers"]])' "${2:-}"
}
rss_kib() { local t=0; for p in "$@"; do t=$((t + $(awk '/VmRSS/ {print $2}' /proc/$p/status))); done; echo $t; }

for part in $PARTS; do
  case $part in
  reload)
    # (a) CLIENTS clients, an echo each per second, through RELOADS reloads of the business group.
    echo "gateway bench: reload: $CLIENTS clients, $RELOADS reloads" >&2
    chat_config reload "$(procs_for "$CLIENTS")"
    "$TOOL" reload-echo --addr 127.0.0.1:18282 --clients "$CLIENTS" --reloads "$RELOADS" \
      --sources "$SOURCES" --reload-cmd "$BIN/host -c $WORK/reload.toml reload chat >/dev/null"
    stop_chat reload
    ;;
  cpu)
    # (b) CPU per echo: through the gateway (every host process counted) against an in-process
    # tokio-tungstenite echo server, one after the other in this run; 32 clients, 8 in flight.
    echo "gateway bench: cpu per echo, gateway against tokio-tungstenite" >&2
    chat_config cpu 1
    # shellcheck disable=SC2046
    echo "through the gateway: $("$TOOL" echo-load --addr 127.0.0.1:18282 --pids "$(pids_of cpu | tr ' ' ,)")"
    stop_chat cpu
    "$TOOL" echo-server --listen 127.0.0.1:18290 > "$WORK/echo-server.out" & KILL+=($!)
    until grep -qs listening "$WORK/echo-server.out"; do sleep 0.05; done
    echo "tokio-tungstenite in-process: $("$TOOL" echo-load --addr 127.0.0.1:18290 --pids "${KILL[-1]}")"
    kill "${KILL[-1]}"
    ;;
  fanout)
    # (c) One `say` to a room of FANOUT members (5 times): until the last member has it.
    echo "gateway bench: fanout to $FANOUT members" >&2
    chat_config fanout "$(procs_for "$FANOUT")"
    "$TOOL" fanout --addr 127.0.0.1:18282 --clients "$FANOUT" --sources "$SOURCES"
    stop_chat fanout
    ;;
  idle)
    # (d) IDLE idle connections (never pinged meanwhile), from 127.0.0.1 to .8, through as many
    # gateway and client processes as the fd limit asks: the gateways' RSS per connection.
    n=$(procs_for "$IDLE")
    echo "gateway bench: $IDLE idle connections, $n gateway processes" >&2
    chat_config idle "$n" 'gateway_ping_interval = "1h"'
    gw=$(pids_of idle gw)
    # shellcheck disable=SC2086
    before=$(rss_kib $gw)
    left=$IDLE
    for i in $(seq "$n"); do
      k=$(( left < PER_PROC ? left : PER_PROC )); left=$((left - k))
      "$TOOL" idle --addr 127.0.0.1:18282 --clients "$k" --sources "$SOURCES" > "$WORK/idle-$i.out" & KILL+=($!)
    done
    until [ "$(cat "$WORK"/idle-*.out | grep -c '^held')" = "$n" ]; do sleep 0.5; done
    held=$(cat "$WORK"/idle-*.out | awk '/^held/ {h += $2; f += $4} END {print h, f}')
    sleep 2
    # shellcheck disable=SC2086
    after=$(rss_kib $gw)
    python3 -c "
held, failed = map(int, '$held'.split()); before, after = $before, $after
print(f'idle: held {held} (failed {failed}) on $n gateway processes; gateway RSS {before} KiB -> {after} KiB: {(after - before) / max(held, 1):.2f} KiB per connection')"
    stop_chat idle
    ;;
  *) echo "gateway bench: unknown part $part (reload, cpu, fanout, idle)" >&2; exit 2 ;;
  esac
done
