#!/usr/bin/env bash
# The all-in-one gateway of the README's quick start, on one machine, with no etcd:
#   - the control plane on its embedded store (.data/control-plane), admin API on 127.0.0.1:7070,
#     proxy config streams on 127.0.0.1:7071, proxies admitted with the token in .data/;
#   - the example `orders` service (an echo server) on 127.0.0.1:9000;
#   - one proxy on 127.0.0.1:8080 (admin: /readyz, /metrics on 127.0.0.1:9901), its
#     last-known-good config in .data/proxy;
# then applies deploy/examples/, waits until the proxy serves it, prints what to try, and stays
# in the foreground. Ctrl-C (or SIGTERM) stops all three cleanly; logs are in .data/logs/.
#
# On a fresh Debian 12 machine it needs only a Rust toolchain: scripts/bootstrap.sh installs protoc.
set -euo pipefail
cd "$(dirname "$0")/.."

ADMIN=127.0.0.1:7070
STREAMS=127.0.0.1:7071
PROXY=127.0.0.1:8080
PROXY_ADMIN=127.0.0.1:9901
UPSTREAM=127.0.0.1:9000
bin=${CARGO_TARGET_DIR:-target}/release   # where cargo build --release puts them

say() { echo "portcullis: $*" >&2; }
die() { say "$*"; exit 1; }

scripts/bootstrap.sh
cargo build --release --bins
mkdir -p .data/logs
token=.data/bootstrap-token
if [ ! -s "$token" ]; then
  (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$token")
  say "created the proxies' bootstrap token in $token"
fi

pids=()
names=()
stop_all() {
  trap - EXIT INT TERM
  [ "${#pids[@]}" -gt 0 ] || return 0
  say "stopping: ${names[*]}"
  local i
  # The proxy first (it drains), the control plane last.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill -TERM "${pids[i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  say "stopped"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME LOG COMMAND...: runs COMMAND in the background, its output in LOG.
start() {
  local name=$1 log=$2
  shift 2
  echo "==== $(date -u +%FT%TZ) $*" >>"$log"
  NO_COLOR=1 "$@" >>"$log" 2>&1 &
  pids+=("$!")
  names+=("$name")
}

# The status code of GET $2 on $1 (host:port), over bash's /dev/tcp (no curl needed); empty if none.
http_status() (
  exec 2>/dev/null
  exec 3<>"/dev/tcp/${1%:*}/${1##*:}" || exit 0
  printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$2" "$1" >&3
  IFS= read -r -t 2 line <&3 || true
  line=${line#HTTP/1.? }
  echo "${line%% *}"
)

# wait_until WHAT LOG PID COMMAND...: polls COMMAND (up to 30 s) while PID runs.
wait_until() {
  local what=$1 log=$2 pid=$3 i
  shift 3
  for i in $(seq 1 300); do
    "$@" && return 0
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$log" >&2; die "$what: the process exited (log: $log)"; }
    sleep 0.1
  done
  tail -n 20 "$log" >&2
  die "$what: not after 30 s (log: $log)"
}

admin_up() { "$bin/portctl" --server "http://$ADMIN" proxies >/dev/null 2>&1; }
answers() { [ -n "$(http_status "$1" "$2")" ]; }
# The proxy is connected and has acknowledged $version, and says it is ready.
proxy_current() {
  local acked
  acked=$("$bin/portctl" --server "http://$ADMIN" proxies 2>/dev/null |
    awk '$1 == "all-in-one" && $6 == "yes" { print $4 }')
  [ "$acked" = "$version" ] && [ "$(http_status "$PROXY_ADMIN" /readyz)" = 200 ]
}

start control-plane .data/logs/control-plane.log "$bin/portcullis-control-plane" --store embedded \
  --data-dir .data/control-plane --admin-listen "$ADMIN" --proxy-listen "$STREAMS" --bootstrap-token-file "$token"
wait_until "control plane on $ADMIN" .data/logs/control-plane.log "${pids[-1]}" admin_up

start upstream .data/logs/upstream.log "$bin/portcullis-example-upstream" --listen "$UPSTREAM" --name orders
wait_until "example upstream on $UPSTREAM" .data/logs/upstream.log "${pids[-1]}" answers "$UPSTREAM" /

start proxy .data/logs/proxy.log "$bin/portcullis-proxy" --id all-in-one --listen "$PROXY" \
  --admin-listen "$PROXY_ADMIN" --control-plane "http://$STREAMS" --bootstrap-token-file "$token" \
  --cache-dir .data/proxy
proxy_pid=${pids[-1]}

applied=$("$bin/portctl" --server "http://$ADMIN" apply -f deploy/examples/) || die "applying deploy/examples/ failed: $applied"
echo "$applied" >&2
version=$(sed -n 's/^applied at revision \([0-9]\+\)$/\1/p' <<<"$applied")
[ -n "$version" ] || die "portctl apply did not report a revision"
wait_until "proxy on $PROXY serving config version $version" .data/logs/proxy.log "$proxy_pid" proxy_current

cat >&2 <<EOF

portcullis: ready — control plane (admin API $ADMIN), proxy $PROXY (config version $version), upstream orders $UPSTREAM
            logs in .data/logs/; Ctrl-C stops everything.

Try:
  curl -i http://$PROXY/health
      200 OK, with the JSON echo of what the orders service received through the proxy:
      {"upstream":"orders","method":"GET","path":"/health","headers":{..., "x-forwarded-for":"127.0.0.1", "x-request-id":...}}
  curl -i http://$PROXY/api/orders/1
      401 application/problem+json: route orders-api requires a JWT (policy orders-read)
  curl -i http://$PROXY/nowhere
      404 application/problem+json: no route

  $bin/portctl proxies                          # this proxy: acknowledged version, lag, last NACK
  $bin/portctl get routes                       # what is stored, with revisions
  $bin/portctl get route orders-health -o yaml
  $bin/portctl diff -f deploy/examples/         # nothing to change
  $bin/portctl export > backup.yaml             # everything, as stored
  $bin/portctl delete policy health-public      # refused: route orders-health uses it
  curl -s http://$PROXY_ADMIN/metrics | grep portcullis_

EOF

# In the foreground until a process exits or a signal arrives; the EXIT trap stops the rest.
# (Ctrl-C in a terminal reaches the children too: they stop on their own, with status 0.)
status=0
wait -n "${pids[@]}" || status=$?
[ "$status" = 0 ] || say "a process exited with status $status; see .data/logs/"
exit "$status"
