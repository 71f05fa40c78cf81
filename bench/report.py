"""Formats bench/run.sh's measurements (passed in the environment) as bench/RESULTS.md."""

import os
import statistics

env = os.environ


def floats(name):
    return [float(x) for x in env[name].split()]


def med(values):
    return statistics.median(values)


anchors = {}
for line in env["R_ANCHORS"].splitlines():  # name cpu_us rps
    name, cpu, rps = line.split()
    anchors.setdefault(name, []).append((float(cpu), float(rps)))
a_cpu = {n: med([c for c, _ in v]) for n, v in anchors.items()}
a_rps = {n: med([r for _, r in v]) for n, v in anchors.items()}


def paired(rounds_a, rounds_b):
    # Median of the per-round ratios: each round measures both within seconds, so a machine
    # that gets faster or slower between rounds moves both alike.
    return med([a[0] / b[0] for a, b in zip(rounds_a, rounds_b)])


# Side by side (run.sh 1b and 8): "a b cpu_a cpu_b rps_a rps_b" per round.
pairs = {}
for line in env.get("R_PAIRS", "").splitlines():
    if line.strip():
        a, b, *vals = line.split()
        pairs.setdefault((a, b), []).append(tuple(float(v) for v in vals))


def pair_ratio(a, b):
    """Median over rounds of b's CPU per request over a's, measured side by side."""
    return med([cb / ca for ca, cb, _, _ in pairs[(a, b)]])


def pair_cpu(a, b):
    rounds = pairs[(a, b)]
    return med([r[0] for r in rounds]), med([r[1] for r in rounds])


plugin_vs_health = pair_ratio("host:/_host/health", "host:/")
health_cpu, plugin_cpu = pair_cpu("host:/_host/health", "host:/")
browser_key = ("host:/_host/health+browser", "host:/+browser")
browser_vs_health = pair_ratio(*browser_key)
browser_health_cpu, browser_plugin_cpu = pair_cpu(*browser_key)
plugin_vs_nginx = paired(anchors["host-plugin"], anchors["nginx"])  # rounds one after the other
nginx_side = pair_ratio("nginx", "host-plugin")  # side by side: what the target is judged on
nginx_cpu, host_side_cpu = pair_cpu("nginx", "host-plugin")
reload4 = floats("R_RELOAD4")
status4 = floats("R_STATUS4")
reload_vs_status = med(reload4) / med(status4)
startup = [line.split() for line in env["STARTUP"].splitlines()]
lat = {line.split()[0]: line.split()[1:] for line in env["LAT"].splitlines()}
steady, during = [int(x) for x in lat["steady"]], [int(x) for x in lat["reload"]]
master_rss, worker_rss = (int(x) for x in env["MEM"].split())
burst = env["BURST"].split()  # "burst <count> <errors> <ms>"
burst_ms, burst_errors = int(burst[3]), int(burst[2])
MiB = 1 << 20


def times(ratio):
    return "∞ (a worker served nothing)" if ratio == float("inf") else f"{ratio:.2f}x"


def verdict(ok):
    return "met" if ok else "**missed**"


p99_ratio = during[3] / max(steady[3], 1)
targets = [
    (
        "CPU per request: the plugin's `/` vs the host's own `/_host/health`, wrk's request (one header)",
        "<= 1.1x",
        f"{plugin_vs_health:.2f}x ({plugin_cpu:.2f} vs {health_cpu:.2f} µs, side by side)",
        verdict(plugin_vs_health <= 1.1),
    ),
    (
        "The same, a browser's request (ten headers, which the plugin receives as its own `HeaderMap`)",
        "<= 1.1x",
        f"{browser_vs_health:.2f}x ({browser_plugin_cpu:.2f} vs {browser_health_cpu:.2f} µs, side by side)",
        verdict(browser_vs_health <= 1.1),
    ),
    (
        # Decided (issue 19): a tracked row, no target.
        "CPU per request: the host's `/` vs nginx `return 200`",
        "tracked",
        f"{nginx_side:.2f}x ({host_side_cpu:.2f} vs {nginx_cpu:.2f} µs, side by side; {plugin_vs_nginx:.2f}x in rounds one after the other)",
        "—",
    ),
    ("`host reload`, 4 idle workers (median)", "<= 50 ms", f"{med(reload4):.1f} ms", verdict(med(reload4) <= 50)),
    (
        "`host reload` of 4 idle workers vs a `host status` round trip (medians, CLI included)",
        "<= 6x",
        f"{reload_vs_status:.1f}x ({med(reload4):.1f} vs {med(status4):.1f} ms)",
        verdict(reload_vs_status <= 6),
    ),
    (
        "p99 during reload vs steady state",
        "<= 2x, 0 errors",
        f"{p99_ratio:.2f}x, {during[1] + steady[1]} errors",
        verdict(p99_ratio <= 2 and during[1] + steady[1] == 0),
    ),
    ("16 x `/sleep?ms=200`, one worker", "<= 0.6 s", f"{burst_ms / 1000:.3f} s, {burst_errors} errors", verdict(burst_ms <= 600 and burst_errors == 0)),
    ("Worker RSS", "<= 8 MiB", f"{worker_rss / MiB:.1f} MiB", verdict(worker_rss <= 8 * MiB)),
    ("Master RSS", "<= 8 MiB", f"{master_rss / MiB:.1f} MiB", verdict(master_rss <= 8 * MiB)),
]
bal = [line.split() for line in env["R_BAL"].splitlines()]  # mode ratio served rps cpu
bal_on = [b for b in bal if b[0] == "true"]
bal_off = [b for b in bal if b[0] == "false"]
worst_on = max(float(b[1]) for b in bal_on)
targets.append(
    (
        "Busiest / least busy worker, 5 s after a reload (32 keep-alive, 4 workers)",
        "<= 2x",
        f"{times(worst_on)} (worst of {len(bal_on)}; {times(max(float(b[1]) for b in bal_off))} with accept_balance off)",
        verdict(worst_on <= 2),
    )
)

kind_paths = ["/async/hello", "/stream/hello", "/sleep?ms=0"]
for path, label in zip(
    kind_paths,
    ["Async handler", "Streamed body (1 chunk)", "Blocking pool (`/sleep?ms=0`)"],
):
    r = pair_ratio("host:/", f"host:{path}")
    inline_cpu, path_cpu = pair_cpu("host:/", f"host:{path}")
    # Decided (issue 19): the blocking pool's thread hand-off is what `Dispatch::Blocking`
    # promises, so its row is tracked, with no target.
    tracked = path == "/sleep?ms=0"
    targets.append(
        (
            f"{label}, ready at once, CPU per request vs the inline path",
            "tracked" if tracked else "<= 1.1x",
            f"{r:.2f}x ({path_cpu:.1f} vs {inline_cpu:.1f} µs, side by side)",
            "—" if tracked else verdict(r <= 1.1),
        )
    )
sl = env["SLEEPERS"].split()  # "sleepers <count> <errors> <ms> <max threads>"
sl_count, sl_errors, sl_ms, sl_threads = int(sl[1]), int(sl[2]), int(sl[3]), int(sl[4])
targets.append(
    (
        f"{sl_count:,} concurrent requests awaiting a 1 s timer, one worker",
        "all answered <= 1.5 s, <= 16 threads",
        f"{sl_ms / 1000:.2f} s, {sl_errors} errors, {sl_threads} threads",
        verdict(sl_ms <= 1500 and sl_errors == 0 and sl_threads <= 16),
    )
)
ws = env["WS_IDLE"].split()  # "ws-idle <open> <errors> <rss before KiB> <rss after KiB> <KiB each>"
ws_count, ws_errors, ws_before, ws_after, ws_each = int(ws[1]), int(ws[2]), int(ws[3]), int(ws[4]), float(ws[5])
targets.append(
    (
        f"Worker RSS per idle WebSocket, {ws_count:,} connections, one worker",
        "<= 16 KiB",
        f"{ws_each:.1f} KiB, {ws_errors} errors",
        verdict(ws_each <= 16 and ws_errors == 0),
    )
)

out = []
w = out.append
w("# Benchmark results")
w("")
w(f"Measured {env['WHEN']} by `bench/run.sh` on: {env['MACHINE']}; {env['RUSTC']}; {env['WRK']}.")
w("The host, the example plugin and the hyper servers are built with `--profile production` (fat LTO, one codegen unit).")
w("Numbers from one run on a shared virtual machine: expect a few percent of noise between runs.")
w("")
w("## Targets")
w("")
w("| what | target | measured | |")
w("|---|---|---|---|")
for t in targets:
    w("| " + " | ".join(t) + " |")
w("")
w("## 1. CPU per request, against what users would pick instead")
w("")
w(
    f"Each server pinned to CPU {env['SERVER_CPU']}, `wrk -t1 -c32 -d{env['SECS']}s` pinned to CPU {env['CLIENT_CPU']}; "
    f"{env['RUNS']} interleaved rounds, medians. CPU time is user + system of every server process over the run "
    "(for the host: master and its one worker; for nginx: master and its one worker), divided by the requests "
    "served: steadier than requests/s on a shared machine. Every server answers a short `text/plain` body on "
    "keep-alive HTTP/1.1. The host's `/` is the example plugin's inline handler; `/_host/health` is answered by "
    "the host itself, same process, same connection handling. In each round nginx and the host run back to back, "
    "in alternating order, so the host / nginx ratio compares measurements seconds apart (the target itself is judged side by side, below)."
)
w("")
w("| server | CPU µs / request | vs nginx | requests/s | CPU µs, each round |")
w("|---|---|---|---|---|")
names = {
    "plain-hyper": "hyper, HTTP/1 only, no header timer (`bare-hyper --plain-h1`)",
    "nginx": f"nginx {env.get('NGINX_VERSION', '')}, one worker, `return 200`",
    "bare-hyper": "hyper with the auto h1/h2 builder and hyper's header timer (`bare-hyper`)",
    "host-health": "host, `/_host/health` (the host's own route)",
    "host-plugin": "host + example plugin, `/` (through the plugin)",
}
for n in ["plain-hyper", "nginx", "bare-hyper", "host-health", "host-plugin"]:
    if n in a_cpu:
        rounds = ", ".join(f"{c:.2f}" for c, _ in anchors[n])
        w(f"| {names[n]} | {a_cpu[n]:.2f} | {a_cpu[n] / a_cpu['nginx']:.2f}x | {a_rps[n]:,.0f} | {rounds} |")
w("")
w(
    f"Ratios (medians of the per-round ratios): plugin path / host's own route {paired(anchors['host-plugin'], anchors['host-health']):.2f}x "
    f"(the target is taken side by side, below: **{plugin_vs_health:.2f}x**); host `/` / nginx {plugin_vs_nginx:.2f}x (the target is taken side by side, below: **{nginx_side:.2f}x**); "
    f"auto h1/h2 hyper with header timer / plain hyper {a_cpu['bare-hyper'] / a_cpu['plain-hyper']:.2f}x; "
    f"host `/_host/health` / that hyper {a_cpu['host-health'] / a_cpu['bare-hyper']:.2f}x (the host keeps both protections, "
    "h2c and the slowloris guard, but its guard is one sweep per worker instead of hyper's timer per request)."
)
w("")
pair_names = {
    ("plain-hyper", "auto-no-timer"): ("hyper with the auto h1/h2 builder, no header timer", "plain HTTP/1 hyper", "the auto builder (h2c detection)"),
    ("auto-no-timer", "bare-hyper"): ("the same with hyper's header-read timer", "without it", "hyper's timer per request head, which the host replaced by one sweep per worker"),
    ("bare-hyper", "host-health"): ("the host's `/_host/health`", "hyper with the auto builder and header timer", "what the host adds around hyper, less what it saves"),
    ("nginx", "host-plugin"): ("the host's `/` (through the plugin)", "nginx `return 200`", "the host against nginx (the target)"),
    ("host:/_host/health", "host:/"): ("the host's `/` (through the plugin)", "the host's `/_host/health`", "the plugin boundary (two identical hosts, swapping paths each round)"),
    browser_key: ("the same, a browser's request", "the same", "the plugin boundary for a request with ten headers (wrk's sends one): each is copied into the plugin's own `HeaderMap`"),
}
w(
    "**Side by side.** Two servers pinned to the same CPU and loaded at the same time (a `wrk -t1 -c32` each, on the other "
    "CPU), so the machine's noise, which moves from second to second, hits both alike: steadier than rounds one after "
    f"the other, for costs of a few percent between set-ups of the same server. {env['RUNS']} rounds of {env['SECS']} s; "
    "which wrk starts first alternates; CPU per request of the first column over the second."
)
w("")
w("| server | against | CPU per request, ratio (median) | each round | what it measures |")
w("|---|---|---|---|---|")
for key, (second, first, what) in pair_names.items():
    if key in pairs:
        rounds = [cb / ca for ca, cb, _, _ in pairs[key]]
        w(f"| {second} | {first} | **{med(rounds):.3f}x** | {', '.join(f'{r:.3f}' for r in rounds)} | {what} |")
w("")
w("## 2. `host reload` of 4 idle workers")
w("")
w(
    f"`host status` round trip on the same host, same run (median of 9): {med(status4):.1f} ms; "
    f"`host reload` / `host status` = {reload_vs_status:.1f}x. The plugin file is unchanged between these reloads, "
    "so each reuses the last snapshot without reading the file again."
)
w("")
w(f"CLI round trip included (the command returns once every slot runs the new generation); 9 runs: "
  f"{', '.join(f'{x:.1f}' for x in reload4)} ms; median **{med(reload4):.1f} ms**.")
changed = floats("R_CHANGED")
snap_ms = floats("R_SNAP_MS")
hash_kv = dict(kv.split("=", 1) for kv in env["HASH"].split())
w("")
w(
    f"After the plugin file changed (16 bytes appended each time, so a new sha256; {int(hash_kv['bytes']) / 1e6:.1f} MB): "
    f"`host reload` took {', '.join(f'{x:.1f}' for x in changed)} ms, median **{med(changed):.1f} ms**; the master's snapshot "
    f"(read, hash, copy, `fsync`, rename) took {', '.join(f'{x:.0f}' for x in snap_ms)} ms, median {med(snap_ms):.0f} ms. "
    f"Its parts measured apart on this machine (`bench-tool hash`, medians of 5): SHA-256 in memory "
    f"{float(hash_kv['sha256_ms']):.1f} ms ({hash_kv['sha256_mb_s']} MB/s, SHA extensions "
    f"{'used' if hash_kv['sha_ni'] == 'true' else 'absent on this CPU'}), reading the file {float(hash_kv['read_ms']):.1f} ms, "
    f"writing and `fsync`ing a copy {float(hash_kv['copy_fsync_ms']):.1f} ms."
)
w("")
w("Where one worker's start goes (mean over the last generation's workers, µs since the master spawned it):")
w("")
w("| phase | µs | cumulative µs |")
w("|---|---|---|")
names = {
    "exec": "fork + exec + dynamic linking of `host`, to `main`",
    "runtime": "logging and tokio runtime set up",
    "spec": "Start order received from the master",
    "dlopen": "plugin snapshot `dlopen`ed (RTLD_NOW), header checked",
    "on_worker_start": "the plugin's `on_worker_start`",
    "ready": "listener registered, ready",
}
for phase, dt, cum in startup:
    w(f"| {names.get(phase, phase)} | {dt} | {cum} |")
w("")
w("## 3. Latency during a reload under load")
w("")
w(
    "16 keep-alive clients (`bench-tool latency`) on the other CPU send back-to-back `GET /` for 8 s to a host with "
    "one worker pinned to one CPU; at 3 s the tool itself runs `host reload`, which starts the new worker on that CPU "
    "beside the old one. The reload window is from the command's start to 1 s after "
    f"it returned (it returned after {lat['reload_command_ms'][0]} ms), which covers the old worker's drain and the "
    "clients' reconnections. Latencies in µs. (With two workers on the one CPU, the workers' turns in scheduler slices "
    "made about 2% of requests wait some 4 ms even in the steady state, and the p99 swung between runs by 4x.)"
)
w("")
w("| | requests | errors | p50 | p99 | max |")
w("|---|---|---|---|---|---|")
w(f"| steady state | {steady[0]:,} | {steady[1]} | {steady[2]} | {steady[3]} | {steady[4]} |")
w(f"| reload window | {during[0]:,} | {during[1]} | {during[2]} | {during[3]} | {during[4]} |")
w("")
w("![latency over time across a reload](latency-during-reload.svg)")
w("")
w("## 4. Blocking handlers")
w("")
w(f"One worker, 16 concurrent `GET /sleep?ms=200` (each on its own connection): the last one finished after "
  f"**{burst_ms} ms**, {burst_errors} errors. `/sleep` is declared blocking, so each runs on the worker's blocking pool.")
w("")
w("## 5. Memory")
w("")
w(f"After section 3's traffic, with the example plugin loaded: master RSS **{master_rss / MiB:.1f} MiB**, largest worker "
  f"RSS **{worker_rss / MiB:.1f} MiB** (`status --json`, from `/proc/<pid>/statm`).")
w("")
w("## 6. Scaling")
w("")
w(f"Throughput with N workers (`wrk -t2 -c64 -d{env['SECS']}s`, nothing pinned: on this machine wrk and the workers "
  "share the same CPUs, so more workers than CPUs cannot add throughput):")
w("")
w("| workers | requests/s |")
w("|---|---|")
for line in env["R_SCALE_RPS"].splitlines():
    n, rps = line.split()
    w(f"| {n} | {float(rps):,.0f} |")
w("")
w("`host reload` time with N idle workers (median of 5; slots are replaced one at a time, so it grows linearly):")
w("")
w("| workers | ms |")
w("|---|---|")
for line in env["R_SCALE_RELOAD"].splitlines():
    n, ms = line.split()
    w(f"| {n} | {ms} |")
w("")
w("## 7. Accept balance after a reload")
w("")
w(
    "4 workers, `wrk -t2 -c32` keep-alive connections (wrk reconnects when a response says `Connection: close`), "
    "`host reload` at 2 s; then the requests each new worker served over 5 s (`status --json`). Then "
    f"`wrk -t1 -c32 -d{env['SECS']}s -H 'Connection: close'` on the same host: a connection per request, where "
    "stepping aside could cost the most. Rounds alternate `accept_balance = true` and `false`; nothing is pinned."
)
w("")
w("| accept_balance | requests per worker, 5 s after the reload | busiest / least busy | close: requests/s | close: CPU µs / request |")
w("|---|---|---|---|---|")
for mode, ratio, served, rps, cpu in bal:
    w(f"| {mode} | {served.replace(',', ', ')} | {times(float(ratio))} | {float(rps):,.0f} | {float(cpu):.1f} |")
w("")
w("## 8. Handler kinds")
w("")
w(
    "Each path against the inline path `/`, side by side (as in section 1: two identical one-worker hosts on one CPU, "
    f"loaded at the same time, swapping paths each round; {env['RUNS']} rounds of {env['SECS']} s). CPU time of every "
    "host process per request, medians."
)
w("")
w("| path | handler kind | CPU µs / request | inline `/`, same rounds | ratio (median of rounds) | each round | requests/s |")
w("|---|---|---|---|---|---|---|")
kind_names = {
    "/async/hello": "async `serve`, ready at once",
    "/stream/hello": "async `serve`, the same answer streamed (1 chunk)",
    "/sleep?ms=0": "`handle` on the blocking pool",
}
for path in kind_paths:
    key = ("host:/", f"host:{path}")
    inline_cpu, path_cpu = pair_cpu(*key)
    rounds = [cb / ca for ca, cb, _, _ in pairs[key]]
    rps = med([r[3] for r in pairs[key]])
    w(
        f"| `{path}` | {kind_names[path]} | {path_cpu:.1f} | {inline_cpu:.1f} | {med(rounds):.2f}x | "
        f"{', '.join(f'{r:.2f}' for r in rounds)} | {rps:,.0f} |"
    )
w("")
w(
    f"{sl_count:,} connections opened first, then one `GET /async/sleep?ms=1000` on each at once (one worker): "
    f"the last answer came {sl_ms / 1000:.2f} s after the first request was sent, {sl_errors} failed, and the "
    f"worker ran at most {sl_threads} threads (sampled every 20 ms)."
)
w("")
w(
    f"{ws_count:,} WebSockets opened on one worker (the example's `/ws` echo, through `plugin_api::websocket`), one "
    f"message exchanged on each, then left idle: the worker's RSS went from {ws_before / 1024:.1f} to "
    f"{ws_after / 1024:.1f} MiB, **{ws_each:.1f} KiB per socket** (after 100 sockets to warm up; {ws_errors} failed)."
)
# The dev loop's section, written by bench/devloop.sh.
devloop = os.path.join(os.path.dirname(os.path.abspath(__file__)), "devloop.md")
if os.path.exists(devloop):
    w("")
    w(open(devloop).read().rstrip("\n"))
print("\n".join(out))
