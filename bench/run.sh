#!/usr/bin/env bash
# The benchmark: the plugin host measured side by side with a bare hyper server, in one run.
# Writes bench/RESULTS.md (tables, targets, machine) and bench/latency-during-reload.svg.
#
#   bench/run.sh            # about ten minutes on a 2-core machine, after the production build
#   bench/run.sh devloop    # only the dev loop's save -> served (bench/devloop.sh), into RESULTS.md
#   bench/run.sh gateway [reload|cpu|fanout|idle ...]  # only the gateway's targets (bench/gateway.sh)
#
# Needs: cargo, python3, taskset (util-linux), wrk (installed with apt-get if missing).
# Benchmarks are not tests: nothing here fails on a number; the targets are reported.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# The dev loop's step alone: its section of RESULTS.md is replaced, the rest kept.
if [ "${1:-}" = devloop ]; then
  bench/devloop.sh
  python3 - "$ROOT/bench/RESULTS.md" "$ROOT/bench/devloop.md" <<'PY'
import sys
results, section = open(sys.argv[1]).read(), open(sys.argv[2]).read()
head = results.split("## 9. Dev loop", 1)[0].rstrip("\n")
open(sys.argv[1], "w").write(head + "\n\n" + section)
PY
  exit 0
fi
# The gateway's targets alone (issue 21): printed, kept by hand in bench/MEASURED.md.
if [ "${1:-}" = gateway ]; then
  shift
  exec bench/gateway.sh "$@"
fi
RUNS=${RUNS:-5}       # interleaved rounds for the throughput comparison (medians are reported)
SECS=${SECS:-5}       # seconds per wrk run

if ! command -v wrk >/dev/null 2>&1; then
  echo "bench: installing wrk" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get install -y -q wrk >/dev/null
fi
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "bench: installing nginx-light" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get install -y -q nginx-light >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
for tool in taskset python3; do
  command -v $tool >/dev/null 2>&1 || { echo "bench: $tool is required" >&2; exit 1; }
done
CPUS=$(nproc)
if [ "$CPUS" -ge 2 ]; then SERVER_CPU=0; CLIENT_CPU=1; else SERVER_CPU=0; CLIENT_CPU=0; fi

# Built as a deployment would be: the `production` profile (fat LTO; see Cargo.toml), for the host,
# the example plugin and the hyper anchors alike.
echo "bench: building (--profile production)" >&2
cargo build --profile production -q -p host -p example-plugin -p bench
BIN=$ROOT/target/production
WORK=$(mktemp -d)
BARE_PID=
NGINX_PID=
cleanup() {
  [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null || true
  for c in "$WORK"/*.toml; do [ -e "$c" ] && "$BIN/host" -c "$c" stop >/dev/null 2>&1 || true; done
  [ -n "$BARE_PID" ] && kill "$BARE_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
install -m 644 "$BIN/libexample_plugin.so" "$WORK/plugin.so"
CLK=$(getconf CLK_TCK)

config() { # name workers port (reloads roll out at once: the figures are the rollout's own)
  printf 'listen = "127.0.0.1:%s"\nworkers = %s\nplugin = "plugin.so"\nstate_dir = "state-%s"\ncanary_workers = 0\n' "$3" "$2" "$1" > "$WORK/$1.toml"
}
start_host() { # name [cpu]: start -d, pinned to a CPU if given (workers inherit it)
  if [ -n "${2:-}" ]; then taskset -c "$2" "$BIN/host" -c "$WORK/$1.toml" start -d >/dev/null
  else "$BIN/host" -c "$WORK/$1.toml" start -d >/dev/null; fi
}
stop_host() { "$BIN/host" -c "$WORK/$1.toml" stop >/dev/null; }
status_json() { "$BIN/host" -c "$WORK/$1.toml" status --json; }
host_pids() { status_json "$1" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["master_pid"], *[w["pid"] for w in s["workers"]])'; }
cpu_ticks() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }
median() { python3 -c 'import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(f"{statistics.median(v):.1f}")' "$@"; }
now_ns() { date +%s%N; }

# wrk against URL, returns "rps requests"; the client is pinned to CLIENT_CPU.
wrk_run() { # url threads connections [cpu]
  local out
  if [ -n "${4:-}" ]; then out=$(taskset -c "$4" wrk -t"$2" -c"$3" -d"${SECS}s" "$1")
  else out=$(wrk -t"$2" -c"$3" -d"${SECS}s" "$1"); fi
  echo "$(echo "$out" | awk '/Requests\/sec/ {print $2}') $(echo "$out" | awk '/requests in/ {print $1}')"
}

# 1. CPU per request and throughput: the host against what users would pick instead, server on
#    one CPU, wrk on the other, RUNS interleaved rounds: plain HTTP/1 hyper, nginx (one worker,
#    `return 200`), bare hyper set up like a worker (auto h1/h2, header timer), and the host
#    (one worker) for the plugin's `/` and its own `/_host/health`.
echo "bench: 1/8 CPU per request vs plain hyper, nginx, bare hyper ($RUNS interleaved rounds of ${SECS}s)" >&2
config one 1 18191
mkdir -p "$WORK/nginx"
cat > "$WORK/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  server {
    listen 127.0.0.1:18182;
    location / { default_type text/plain; return 200 "hello from nginx 0.1.0\npid 0 generation 0 slot 0\n"; }
  }
}
NGINX
ANCHORS=()  # "name cpu_us rps"
measure() { # name url pids...
  local name=$1 url=$2; shift 2
  # shellcheck disable=SC2068
  t0=$(cpu_ticks $@); read -r rps n < <(wrk_run "$url" 1 32 $CLIENT_CPU); t1=$(cpu_ticks $@)
  ANCHORS+=("$name $(python3 -c "print(($t1-$t0)/$CLK*1e6/$n)") $rps")
}
wait_port() { until (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; do :; done; }
measure_nginx() {
  taskset -c $SERVER_CPU "$NGINX" -c "$WORK/nginx.conf" -e "$WORK/nginx/error.log" & NGINX_PID=$!
  wait_port 18182; sleep 0.2
  measure nginx http://127.0.0.1:18182/ $NGINX_PID $(pgrep -P $NGINX_PID)
  kill $NGINX_PID; wait $NGINX_PID 2>/dev/null || true; NGINX_PID=
}
measure_host() {
  start_host one $SERVER_CPU
  pids=$(host_pids one)
  # shellcheck disable=SC2086
  measure host-plugin http://127.0.0.1:18191/ $pids
  # shellcheck disable=SC2086
  measure host-health http://127.0.0.1:18191/_host/health $pids
  stop_host one
}
# nginx and the host are measured back to back, in alternating order, so the ratio the target
# names compares rounds a few seconds apart.
for i in $(seq "$RUNS"); do
  taskset -c $SERVER_CPU "$BIN/bare-hyper" --addr 127.0.0.1:18180 --plain-h1 & BARE_PID=$!
  wait_port 18180; measure plain-hyper http://127.0.0.1:18180/ $BARE_PID
  kill $BARE_PID; wait $BARE_PID 2>/dev/null || true; BARE_PID=

  taskset -c $SERVER_CPU "$BIN/bare-hyper" --addr 127.0.0.1:18181 & BARE_PID=$!
  wait_port 18181; measure bare-hyper http://127.0.0.1:18181/ $BARE_PID
  kill $BARE_PID; wait $BARE_PID 2>/dev/null || true; BARE_PID=

  if [ $((i % 2)) = 1 ]; then measure_nginx; measure_host; else measure_host; measure_nginx; fi
done

# 1b. Side by side: two servers pinned to the same CPU and loaded at the same time (a wrk each,
#     on the other CPU), so the machine's noise, which moves from second to second, hits both
#     alike. Steadier than rounds one after the other for costs of a few percent between two
#     set-ups of the same server. The wrk that starts first alternates between rounds; for two
#     paths of the host, so does which of two identical hosts serves which path.
pair_round() { # url_a pids_a url_b pids_b swap [wrk script] -> "cpu_a cpu_b rps_a rps_b"
  local a0 b0 a1 b1 wa wb
  local script=()
  if [ -n "${6:-}" ]; then script=(-s "$6"); fi
  # shellcheck disable=SC2086
  a0=$(cpu_ticks $2); b0=$(cpu_ticks $4)
  if [ "$5" = 1 ]; then
    taskset -c "$CLIENT_CPU" wrk -t1 -c32 -d"${SECS}s" "${script[@]}" "$3" > "$WORK/wrk-b.txt" & wb=$!
    taskset -c "$CLIENT_CPU" wrk -t1 -c32 -d"${SECS}s" "${script[@]}" "$1" > "$WORK/wrk-a.txt" & wa=$!
  else
    taskset -c "$CLIENT_CPU" wrk -t1 -c32 -d"${SECS}s" "${script[@]}" "$1" > "$WORK/wrk-a.txt" & wa=$!
    taskset -c "$CLIENT_CPU" wrk -t1 -c32 -d"${SECS}s" "${script[@]}" "$3" > "$WORK/wrk-b.txt" & wb=$!
  fi
  wait $wa $wb
  # shellcheck disable=SC2086
  a1=$(cpu_ticks $2); b1=$(cpu_ticks $4)
  python3 - "$WORK/wrk-a.txt" "$WORK/wrk-b.txt" "$((a1 - a0))" "$((b1 - b0))" "$CLK" <<'PY'
import re, sys
def parse(f):
    t = open(f).read()
    return int(re.search(r"(\d+) requests in", t).group(1)), float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
(na, ra), (nb, rb) = parse(sys.argv[1]), parse(sys.argv[2])
clk = float(sys.argv[5])
print(int(sys.argv[3]) / clk * 1e6 / na, int(sys.argv[4]) / clk * 1e6 / nb, ra, rb)
PY
}
side_by_side() { # name_a url_a pids_a name_b url_b pids_b -> PAIRS += "name_a name_b cpu_a cpu_b rps_a rps_b"
  for i in $(seq "$RUNS"); do
    PAIRS+=("$1 $4 $(pair_round "$2" "$3" "$5" "$6" $((i % 2)))")
  done
}
side_by_side_paths() { # path_a path_b [wrk script tag]: two identical hosts (`one`, `two`),
  # roles swapped each round; with a tag, wrk runs $WORK/<tag>.lua and the pair is named after it
  local one two script="" tag=""
  one=$(host_pids one); two=$(host_pids two)
  if [ -n "${3:-}" ]; then script="$WORK/$3.lua"; tag="+$3"; fi
  for i in $(seq "$RUNS"); do
    if [ $((i % 2)) = 1 ]; then
      PAIRS+=("host:$1$tag host:$2$tag $(pair_round "http://127.0.0.1:18191$1" "$one" "http://127.0.0.1:18195$2" "$two" 0 "$script")")
    else
      read -r cb ca rb ra < <(pair_round "http://127.0.0.1:18191$2" "$one" "http://127.0.0.1:18195$1" "$two" 0 "$script")
      PAIRS+=("host:$1$tag host:$2$tag $ca $cb $ra $rb")
    fi
  done
}
# A browser's request: wrk's own carries one header (Host); a browser's navigation some ten.
cat > "$WORK/browser.lua" <<'LUA'
wrk.headers["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
wrk.headers["Accept"] = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
wrk.headers["Accept-Language"] = "en-US,en;q=0.5"
wrk.headers["Accept-Encoding"] = "gzip, deflate, br, zstd"
wrk.headers["Cookie"] = "session=0123456789abcdef0123456789abcdef; theme=dark"
wrk.headers["Referer"] = "http://127.0.0.1/"
wrk.headers["Sec-Fetch-Dest"] = "document"
wrk.headers["Sec-Fetch-Mode"] = "navigate"
wrk.headers["Upgrade-Insecure-Requests"] = "1"
LUA
PAIRS=()
taskset -c $SERVER_CPU "$BIN/bare-hyper" --addr 127.0.0.1:18180 --plain-h1 & PLAIN_PID=$!
taskset -c $SERVER_CPU "$BIN/bare-hyper" --addr 127.0.0.1:18183 --no-header-timer & NOTIMER_PID=$!
taskset -c $SERVER_CPU "$BIN/bare-hyper" --addr 127.0.0.1:18181 & BARE_PID=$!
wait_port 18180; wait_port 18183; wait_port 18181
side_by_side plain-hyper http://127.0.0.1:18180/ $PLAIN_PID auto-no-timer http://127.0.0.1:18183/ $NOTIMER_PID
side_by_side auto-no-timer http://127.0.0.1:18183/ $NOTIMER_PID bare-hyper http://127.0.0.1:18181/ $BARE_PID
config two 1 18195
start_host one $SERVER_CPU
start_host two $SERVER_CPU
side_by_side bare-hyper http://127.0.0.1:18181/ $BARE_PID host-health http://127.0.0.1:18191/_host/health "$(host_pids one)"
kill $PLAIN_PID $NOTIMER_PID $BARE_PID; wait $PLAIN_PID $NOTIMER_PID $BARE_PID 2>/dev/null || true; BARE_PID=
# nginx against the host's `/`, side by side: the target's ratio with the machine's noise, which
# moved nginx's own rounds by up to 40% in one run, hitting both alike.
taskset -c $SERVER_CPU "$NGINX" -c "$WORK/nginx.conf" -e "$WORK/nginx/error.log" & NGINX_PID=$!
wait_port 18182; sleep 0.2
side_by_side nginx http://127.0.0.1:18182/ "$NGINX_PID $(pgrep -P $NGINX_PID)" host-plugin http://127.0.0.1:18191/ "$(host_pids one)"
kill $NGINX_PID; wait $NGINX_PID 2>/dev/null || true; NGINX_PID=
side_by_side_paths /_host/health /
side_by_side_paths /_host/health / browser
stop_host one
stop_host two

# 2. Reload of 4 idle workers, CLI round trip included, against a `status` round trip on the
#    same host, and where worker start time goes.
echo "bench: 2/8 reload time, 4 idle workers" >&2
config four 4 18192
start_host four
RELOAD4=(); STATUS4=()
for _ in $(seq 9); do
  t0=$(now_ns); "$BIN/host" -c "$WORK/four.toml" reload >/dev/null; t1=$(now_ns)
  RELOAD4+=("$(python3 -c "print(($t1-$t0)/1e6)")")
  t0=$(now_ns); "$BIN/host" -c "$WORK/four.toml" status >/dev/null; t1=$(now_ns)
  STATUS4+=("$(python3 -c "print(($t1-$t0)/1e6)")")
done
# A changed plugin file: each round appends 16 random bytes (a new sha256; trailing bytes leave
# the ELF loadable), so the reload reads, hashes, copies and syncs it. `snapshot_ms` is the
# master's own figure from its log; `bench-tool hash` gives the parts' floor on this machine.
CHANGED=(); SNAP_MS=()
for _ in $(seq 5); do
  head -c 16 /dev/urandom >> "$WORK/plugin.so"
  t0=$(now_ns); "$BIN/host" -c "$WORK/four.toml" reload >/dev/null; t1=$(now_ns)
  CHANGED+=("$(python3 -c "print(($t1-$t0)/1e6)")")
  SNAP_MS+=("$(grep -o 'kind="reload" snapshot_ms=[0-9]*' "$WORK/state-four/host.log" | tail -1 | cut -d= -f3)")
done
HASH=$("$BIN/bench-tool" hash --file "$WORK/plugin.so" --dir "$WORK/state-four")
STARTUP=$(status_json four | python3 -c '
import json, sys
ws = [w["startup_us"] for w in json.load(sys.stdin)["workers"] if w.get("startup_us")]
keys = ["exec_us", "runtime_us", "spec_us", "dlopen_us", "on_worker_start_us", "ready_us"]
avg = {k: sum(w[k] for w in ws) / len(ws) for k in keys}
prev = 0
for k in keys:
    print(f"{k[:-3]} {avg[k]-prev:.0f} {avg[k]:.0f}")
    prev = avg[k]
')
stop_host four

# 8. Handler kinds, side by side (as in 1b): CPU per request of an async handler that is ready
#    at once (`/async/hello`), the same answer as a streamed one-chunk body (`/stream/hello`), and
#    the blocking pool (`/sleep?ms=0`),
#    each against the inline path (`/`). Then 10,000 concurrent requests that each await a 1 s
#    timer in one worker: time to the last answer, and the worker's threads. And the worker
#    memory of 5,000 idle WebSockets.
echo "bench: 8/8 handler kinds ($RUNS rounds each), 10,000 sleeping requests, 5,000 idle WebSockets" >&2
start_host one $SERVER_CPU
start_host two $SERVER_CPU
for path in "/async/hello" "/stream/hello" "/sleep?ms=0"; do
  side_by_side_paths / "$path"
done
stop_host one
stop_host two
config sleepers 1 18199
start_host sleepers $SERVER_CPU
SLEEPER_PID=$(status_json sleepers | python3 -c 'import json,sys; print(json.load(sys.stdin)["workers"][0]["pid"])')
SLEEPERS=$( (ulimit -n "$(ulimit -Hn)"; taskset -c $CLIENT_CPU "$BIN/bench-tool" sleepers --addr 127.0.0.1:18199 \
  --path '/async/sleep?ms=1000' --count 10000 --pid "$SLEEPER_PID") )
stop_host sleepers
# What an idle WebSocket costs the worker: 5,000 of them (the example's `/ws` echo), each having
# exchanged one message, on one worker.
config wsidle 1 18198
start_host wsidle $SERVER_CPU
WS_PID=$(status_json wsidle | python3 -c 'import json,sys; print(json.load(sys.stdin)["workers"][0]["pid"])')
WS_IDLE=$( (ulimit -n "$(ulimit -Hn)"; taskset -c $CLIENT_CPU "$BIN/bench-tool" ws-idle --addr 127.0.0.1:18198 \
  --count 5000 --pid "$WS_PID") )
stop_host wsidle

# 3. Latency across a reload under load (16 keep-alive clients, reload at 3 s of 8 s). One
#    worker on the server's CPU: two workers pinned to one CPU take turns in scheduler slices
#    when both are busy (in one trial 2% of requests waited about 4 ms in the steady state), so
#    the p99 measured the scheduler rather than the reload.
echo "bench: 3/8 latency during a reload under load" >&2
config lat 1 18193
start_host lat $SERVER_CPU
LAT=$(taskset -c $CLIENT_CPU "$BIN/bench-tool" latency --addr 127.0.0.1:18193 --connections 16 --duration 8s \
  --reload-at 3s --reload-cmd "$BIN/host -c $WORK/lat.toml reload" --csv "$WORK/latency.csv" \
  --svg "$ROOT/bench/latency-during-reload.svg")

# 5. Memory, with the example plugin loaded and after that traffic.
MEM=$(status_json lat | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(s["master_rss_bytes"], max(w["rss_bytes"] for w in s["workers"]))')
stop_host lat

# 4. One worker, 16 concurrent blocking requests of 200 ms.
echo "bench: 4/8 16 concurrent /sleep?ms=200 on one worker" >&2
config burst 1 18194
start_host burst
BURST=$("$BIN/bench-tool" burst --addr 127.0.0.1:18194 --path '/sleep?ms=200' --count 16)
stop_host burst

# 6. Scaling: throughput with 1, 2, 4 workers (no pinning: wrk shares the CPUs), reload time
#    with 1, 4, 16 workers.
echo "bench: 6/8 scaling" >&2
SCALE_RPS=()
for n in 1 2 4; do
  config "s$n" "$n" $((18200 + n)); start_host "s$n"
  read -r rps _ < <(wrk_run "http://127.0.0.1:$((18200 + n))/" 2 64)
  SCALE_RPS+=("$n $rps"); stop_host "s$n"
done
SCALE_RELOAD=()
for n in 1 4 16; do
  config "r$n" "$n" $((18220 + n)); start_host "r$n"
  times=()
  for _ in $(seq 5); do
    t0=$(now_ns); "$BIN/host" -c "$WORK/r$n.toml" reload >/dev/null; t1=$(now_ns)
    times+=("$(python3 -c "print(($t1-$t0)/1e6)")")
  done
  SCALE_RELOAD+=("$n $(median "${times[@]}")"); stop_host "r$n"
done

# 7. Accept balance after a reload, with accept_balance on and off, 2 alternated rounds each:
#    4 workers, wrk with 32 keep-alive connections (it reconnects when told to close), a reload at
#    2 s, then each new worker's share of the following 5 s. And Connection: close throughput on
#    4 workers, on and off, CPU per request over every host process.
echo "bench: 7/8 accept balance after a reload, on and off" >&2
BAL=()
for _ in 1 2; do
  for mode in true false; do
    config "bal-$mode" 4 18240; echo "accept_balance = $mode" >> "$WORK/bal-$mode.toml"
    start_host "bal-$mode"
    wrk -t2 -c32 -d10s http://127.0.0.1:18240/ >/dev/null & WRK_PID=$!
    sleep 2
    "$BIN/host" -c "$WORK/bal-$mode.toml" reload >/dev/null
    sleep 2 # the old workers' idle_grace (1 s) and drain
    s0=$(status_json "bal-$mode"); sleep 5; s1=$(status_json "bal-$mode")
    wait $WRK_PID
    share=$(python3 -c '
import json, sys
s0, s1 = (json.loads(a) for a in sys.argv[1:])
before = {w["pid"]: w["requests"] for w in s0["workers"] if w["state"] == "ready"}
served = [w["requests"] - before[w["pid"]] for w in s1["workers"] if w["pid"] in before]
ratio = max(served) / min(served) if min(served) else float("inf")
print(f"{ratio:.2f}", ",".join(str(n) for n in served))
' "$s0" "$s1")
    pids=$(host_pids "bal-$mode")
    # shellcheck disable=SC2086
    t0=$(cpu_ticks $pids)
    out=$(wrk -t1 -c32 -d"${SECS}s" -H "Connection: close" http://127.0.0.1:18240/)
    t1=$(cpu_ticks $pids)
    n=$(echo "$out" | awk '/requests in/ {print $1}'); rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    BAL+=("$mode $share $rps $(python3 -c "print(($t1-$t0)/$CLK*1e6/$n)")")
    stop_host "bal-$mode"
  done
done

# The dev loop: save -> served (writes bench/devloop.md, which the report includes).
"$ROOT/bench/devloop.sh" >/dev/null

# Results.
# (Arrays cannot be exported: each goes out as a space- or line-separated string.)
R_ANCHORS="$(printf '%s\n' "${ANCHORS[@]}")"
R_PAIRS="$(printf '%s\n' "${PAIRS[@]}")"
export R_PAIRS
export R_ANCHORS R_RELOAD4="${RELOAD4[*]}" R_STATUS4="${STATUS4[*]}" STARTUP LAT MEM BURST
export R_CHANGED="${CHANGED[*]}" R_SNAP_MS="${SNAP_MS[*]}" HASH
R_SCALE_RPS="$(printf '%s\n' "${SCALE_RPS[@]}")"
R_SCALE_RELOAD="$(printf '%s\n' "${SCALE_RELOAD[@]}")"
R_BAL="$(printf '%s\n' "${BAL[@]}")"
export R_SCALE_RPS R_SCALE_RELOAD R_BAL SLEEPERS WS_IDLE
export MACHINE="$(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, Linux $(uname -r)"
export RUSTC="$(rustc --version)" WRK="$(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)" WHEN="$(date -u +%Y-%m-%d)" NGINX_VERSION="$("$NGINX" -v 2>&1 | cut -d/ -f2)"
export SECS RUNS SERVER_CPU CLIENT_CPU
python3 "$ROOT/bench/report.py" > "$ROOT/bench/RESULTS.md"
echo "bench: wrote bench/RESULTS.md and bench/latency-during-reload.svg" >&2
cat "$ROOT/bench/RESULTS.md"
