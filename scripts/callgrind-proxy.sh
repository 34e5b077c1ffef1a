#!/usr/bin/env bash
# Instructions per proxied request, deterministically: the dist proxy (one worker) under
# callgrind in front of an nginx upstream answering `200 ok` (as in ../shared/bench/peers.sh),
# counters zeroed after a warm-up, then N keep-alive requests (h2load --h1, 64 connections).
# Wall-clock rps on a shared machine is noisy; these counts move by about 0.2% between runs.
#
#   cargo build --profile dist --bins   (or --release: used when target/dist has none)
#   scripts/callgrind-proxy.sh [N]          # default N = 20000
#
# Needs valgrind (callgrind_control), nginx, h2load, curl. Ports PORTCULLIS_PROF_BASE..+11
# (default 28180). Keeps the profile as target/callgrind/callgrind.out.<pid>.1 for
# callgrind_annotate (delete it when done: a few hundred KB each).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20000}
base=${PORTCULLIS_PROF_BASE:-28180}
bin=${PORTCULLIS_BIN_DIR:-target/dist}
[ -x "$bin/portcullis-proxy" ] || bin=target/release
echo "$(basename "$0"): binaries from $bin" >&2
for b in portcullis-control-plane portcullis-proxy portctl; do
  [ -x "$bin/$b" ] || { echo "$bin/$b not found: run 'cargo build --release --bins' first" >&2; exit 1; }
done
for t in valgrind callgrind_control nginx h2load curl; do
  command -v "$t" >/dev/null || { echo "$t not found" >&2; exit 1; }
done
work=$(mktemp -d "${TMPDIR:-/tmp}/portcullis-callgrind.XXXXXX")
out=target/callgrind
mkdir -p "$out" "$work/up"
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

up=127.0.0.1:$base admin=127.0.0.1:$((base + 1)) streams=127.0.0.1:$((base + 2)) listen=127.0.0.1:$((base + 10))
cat >"$work/up/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $work/up/nginx.pid; error_log $work/up/error.log;
events { worker_connections 1024; }
http { access_log off; server { listen $up; keepalive_requests 10000000; location / { return 200 "ok\n"; } } }
NGINX
nginx -p "$work/up" -c "$work/up/nginx.conf" -e "$work/up/error.log" &
pids+=($!)
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/token"
"$bin/portcullis-control-plane" --store embedded --data-dir "$work/cp" --admin-listen "$admin" \
  --proxy-listen "$streams" --bootstrap-token-file "$work/token" 2>"$work/cp.log" &
pids+=($!)
for _ in $(seq 1 100); do "$bin/portctl" --server "http://$admin" proxies >/dev/null 2>&1 && break; sleep 0.1; done
cat >"$work/config.yaml" <<YAML
kind: Upstream
name: bench-upstream
spec:
  endpoints: ["$up"]
---
kind: Route
name: bench-all
spec:
  match: {path: {prefix: /}}
  upstream: bench-upstream
  policy: bench-policy
---
kind: Policy
name: bench-policy
spec:
  authentication: {mode: public, reason: profiling without authentication}
YAML
"$bin/portctl" --server "http://$admin" apply -f "$work/config.yaml" >/dev/null

valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out.%p" \
  "$bin/portcullis-proxy" --id callgrind --listen "$listen" --admin-listen 127.0.0.1:$((base + 11)) \
  --control-plane "http://$streams" --bootstrap-token-file "$work/token" --cache-dir "$work/cache" \
  --worker-threads 1 2>"$work/proxy.log" &
proxy=$!
pids+=("$proxy")
for _ in $(seq 1 600); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$listen/" || true)" = 200 ] && break
  kill -0 "$proxy" 2>/dev/null || { tail -20 "$work/proxy.log" >&2; exit 1; }
  sleep 0.2
done
h2load --h1 -n 2000 -c 64 "http://$listen/" >/dev/null
callgrind_control -z "$proxy" >/dev/null
h2load --h1 -n "$n" -c 64 "http://$listen/" | grep -E "^requests:|^status codes:"
callgrind_control -d "$proxy" >/dev/null
profile=$(ls -t "$out"/callgrind.out."$proxy".* 2>/dev/null | grep -v "out.$proxy\$" | head -1)
total=$(awk '/^(summary|totals):/ { print $2; exit }' "$profile")
echo "$((total / n)) instructions per request ($total over $n requests; profile: $profile)"
