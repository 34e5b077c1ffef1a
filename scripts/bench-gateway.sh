#!/usr/bin/env bash
# Portcullis as the gateway under test of the shared peer benchmark (../shared/bench/peers.sh):
#
#   cargo build --profile dist --bins   (or --release: used when target/dist has none)
#   GATEWAY_CMD='scripts/bench-gateway.sh' GATEWAY_AUTH=none bash ../shared/bench/peers.sh
#
# peers.sh runs this from the project root, pinned to the CPU under test, with BENCH_GATEWAY_PORT,
# BENCH_UPSTREAM and BENCH_TMP exported (see `peers.sh --help`); it pins, this script does not.
# It starts, from target/dist (else target/release):
#   - the control plane on its embedded store (in a fresh dir under $BENCH_TMP, admin API and
#     proxy listener on ephemeral loopback ports, read back from its log), with a bootstrap token;
#   - ONE proxy with --worker-threads 1 on 127.0.0.1:$BENCH_GATEWAY_PORT;
# applies a config with portctl (upstream = $BENCH_UPSTREAM, a prefix `/` route), and stays in the
# foreground until a child exits or it gets SIGTERM/SIGINT, then stops both.
#
# Authentication: when peers.sh provides the JWT keys (BENCH_RS256_PUB / BENCH_ES256_PUB, with
# BENCH_JWT_ISS, BENCH_JWT_AUD, BENCH_RS256_KID, BENCH_ES256_KID), the route's policy verifies
# RS256 and ES256 tokens of that issuer (keys given inline, converted from the PEM files). peers.sh
# loads one URL for every GATEWAY_AUTH kind, and kind `none` expects 2xx without a token, so by
# default the policy is `optional`: no token passes anonymously, any token sent is verified (bad
# ones get 401). Its JWT preflight's "missing token gets 4xx" check then fails by design; run
# with PORTCULLIS_BENCH_AUTH=required (and GATEWAY_AUTH without `none`) to check that too.
# PORTCULLIS_BENCH_AUTH=public|optional|required overrides the choice.
#
# peers.sh counts any HTTP answer on the port as "up", so the proxy must serve the config from its
# very first connection: a first proxy run (on ephemeral ports) receives the config and writes its
# last-known-good cache, and the benchmarked proxy starts on that cache (loaded before it binds),
# then reconnects to the control plane. Logs: $BENCH_TMP/portcullis.*/{control-plane,proxy}.log.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "bench-gateway: $*" >&2; exit 1; }
: "${BENCH_GATEWAY_PORT:?not set: run this through peers.sh as GATEWAY_CMD}"
# peers.sh documents BENCH_UPSTREAM/BENCH_UPSTREAM_URL but (as of 2026-11-27) does not export
# them; its upstream is then on the first port of its range, ten below the gateway's.
if [ -z "${BENCH_UPSTREAM:-}" ]; then
  if [ -n "${BENCH_UPSTREAM_URL:-}" ]; then
    BENCH_UPSTREAM=${BENCH_UPSTREAM_URL#http://}
  else
    BENCH_UPSTREAM=127.0.0.1:$((BENCH_GATEWAY_PORT - 10))
    echo "bench-gateway: BENCH_UPSTREAM not set; using peers.sh's layout: $BENCH_UPSTREAM" >&2
  fi
fi
BENCH_UPSTREAM=${BENCH_UPSTREAM%/}
BENCH_TMP=${BENCH_TMP:-${TMPDIR:-/tmp}}

bin=${PORTCULLIS_BIN_DIR:-target/dist}
[ -x "$bin/portcullis-proxy" ] || bin=target/release
echo "$(basename "$0"): binaries from $bin" >&2
for b in portcullis-control-plane portcullis-proxy portctl; do
  [ -x "$bin/$b" ] || die "$bin/$b not found: run 'cargo build --release --bins' first"
done
work=$(mktemp -d "$BENCH_TMP/portcullis.XXXXXX")
export NO_COLOR=1

pids=()
cleanup() {
  trap - EXIT INT TERM
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# The first loopback address logged on a line containing $2 in log $1 (waits up to 20 s).
logged_addr() {
  local log=$1 what=$2 pid=$3 addr i
  for i in $(seq 1 200); do
    addr=$(grep -m1 -F "$what" "$log" 2>/dev/null | grep -o '127\.0\.0\.1:[0-9]\+' | head -1 || true)
    [ -n "$addr" ] && { echo "$addr"; return 0; }
    kill -0 "$pid" 2>/dev/null || { tail -20 "$log" >&2; die "process $pid exited (log: $log)"; }
    sleep 0.1
  done
  tail -20 "$log" >&2
  die "no '$what' in $log after 20 s"
}

# The status code of GET $3 on 127.0.0.1:$2, over bash's /dev/tcp (no curl needed); empty if none.
# A subshell, so that its redirections (and bash's "connection refused") stay in it.
http_status() (
  port=$1 path=$2 line=""
  exec 2>/dev/null
  exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 0
  printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1:%s\r\n\r\n' "$path" "$port" >&3
  IFS= read -r -t 2 line <&3 || true
  line=${line#HTTP/1.? }
  echo "${line%% *}"
)

# The version proxy $1 has acknowledged, as `portctl proxies` shows it (empty if not connected).
acked() {
  "$bin/portctl" --server "http://$admin" proxies 2>/dev/null | awk -v id="$1" '$1 == id && $6 == "yes" { print $4 }'
}

head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/bootstrap-token"

"$bin/portcullis-control-plane" --store embedded --data-dir "$work/control-plane" \
  --admin-listen 127.0.0.1:0 --proxy-listen 127.0.0.1:0 \
  --bootstrap-token-file "$work/bootstrap-token" 2>"$work/control-plane.log" &
cp_pid=$!
pids+=("$cp_pid")
admin=$(logged_addr "$work/control-plane.log" "admin API listening" "$cp_pid")
streams=$(logged_addr "$work/control-plane.log" "config streams listening" "$cp_pid")

# A JWK Set (JSON) of the benchmark's public keys: PEM (SPKI) -> JWK with the openssl CLI.
# Arguments: rsa|ec:PEM_FILE:KID ...
bench_jwks() {
  python3 - "$@" <<'PY'
import base64, json, subprocess, sys
def b64(b): return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
def run(*args): return subprocess.run(["openssl", *args], check=True, capture_output=True).stdout
keys = []
for spec in sys.argv[1:]:
    kind, path, kid = spec.split(":", 2)
    if kind == "rsa":
        n = bytes.fromhex(run("rsa", "-pubin", "-in", path, "-noout", "-modulus").decode().strip().split("=", 1)[1])
        e = int([l for l in run("rsa", "-pubin", "-in", path, "-noout", "-text").decode().splitlines() if l.startswith("Exponent")][0].split()[1])
        keys.append({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": b64(n), "e": b64(e.to_bytes((e.bit_length() + 7) // 8, "big"))})
    else:
        point = run("pkey", "-pubin", "-in", path, "-outform", "DER")[-65:]  # the uncompressed point ends a P-256 SPKI
        assert point[0] == 4, "not an uncompressed P-256 point"
        keys.append({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig", "x": b64(point[1:33]), "y": b64(point[33:])})
print(json.dumps({"keys": keys}))
PY
}

auth_mode=${PORTCULLIS_BENCH_AUTH:-}
if [ -z "$auth_mode" ]; then
  if [ -n "${BENCH_RS256_PUB:-}" ] && [ -n "${BENCH_ES256_PUB:-}" ]; then auth_mode=optional; else auth_mode=public; fi
fi
cat >"$work/config.yaml" <<EOF
kind: Upstream
name: bench-upstream
spec:
  endpoints: ["$BENCH_UPSTREAM"]
---
kind: Route
name: bench-all
spec:
  match: {path: {prefix: /}}
  upstream: bench-upstream
  policy: bench-policy
---
EOF
case "$auth_mode" in
  public)
    cat >>"$work/config.yaml" <<EOF
kind: Policy
name: bench-policy
spec:
  authentication: {mode: public, reason: peer benchmark without authentication}
EOF
    ;;
  optional | required)
    : "${BENCH_RS256_PUB:?needed for PORTCULLIS_BENCH_AUTH=$auth_mode}" "${BENCH_ES256_PUB:?}"
    : "${BENCH_JWT_ISS:?}" "${BENCH_JWT_AUD:?}"
    jwks=$(bench_jwks "rsa:$BENCH_RS256_PUB:${BENCH_RS256_KID:-rs256}" "ec:$BENCH_ES256_PUB:${BENCH_ES256_KID:-es256}") ||
      die "cannot convert the benchmark's public keys to a JWK Set"
    cat >>"$work/config.yaml" <<EOF
kind: Issuer
name: bench-idp
spec:
  issuer: "$BENCH_JWT_ISS"
  audiences: ["$BENCH_JWT_AUD"]
  algorithms: [RS256, ES256]
  keys: {inline: $jwks}
---
kind: Policy
name: bench-policy
spec:
  authentication: {mode: $auth_mode, issuers: [bench-idp]}
EOF
    ;;
  *) die "PORTCULLIS_BENCH_AUTH must be public, optional or required (got $auth_mode)" ;;
esac
applied=$("$bin/portctl" --server "http://$admin" apply -f "$work/config.yaml") || die "portctl apply failed: $applied"
version=$(sed -n 's/^applied at revision \([0-9]\+\)$/\1/p' <<<"$applied")
[ -n "$version" ] || die "portctl apply did not report a revision: $applied"

proxy() {  # proxy LISTEN_ADDR LOG: starts the proxy in the background
  "$bin/portcullis-proxy" --id bench-gateway --listen "$1" --admin-listen 127.0.0.1:0 \
    --control-plane "http://$streams" --bootstrap-token-file "$work/bootstrap-token" \
    --cache-dir "$work/proxy-cache" --worker-threads 1 2>>"$2" &
}

# First run: fetch the config into the last-known-good cache, then drain and exit.
proxy 127.0.0.1:0 "$work/proxy-warmup.log"
warm_pid=$!
pids+=("$warm_pid")
for i in $(seq 1 200); do
  [ "$(acked bench-gateway)" = "$version" ] && break
  kill -0 "$warm_pid" 2>/dev/null || { tail -20 "$work/proxy-warmup.log" >&2; die "the proxy exited"; }
  [ "$i" = 200 ] && { tail -20 "$work/proxy-warmup.log" >&2; die "the proxy did not acknowledge version $version in 20 s"; }
  sleep 0.1
done
kill -TERM "$warm_pid"
wait "$warm_pid" || die "the first proxy run did not exit cleanly"
pids=("$cp_pid")

# The benchmarked proxy: ready from its cache the moment it listens.
proxy "127.0.0.1:$BENCH_GATEWAY_PORT" "$work/proxy.log"
proxy_pid=$!
pids=("$proxy_pid" "$cp_pid")
for i in $(seq 1 200); do
  case "$(http_status "$BENCH_GATEWAY_PORT" /)" in 200 | 401) served=yes ;; *) served=no ;; esac
  [ "$served" = yes ] && [ "$(acked bench-gateway)" = "$version" ] && break
  kill -0 "$proxy_pid" 2>/dev/null || { tail -20 "$work/proxy.log" >&2; die "the proxy exited"; }
  [ "$i" = 200 ] && { tail -20 "$work/proxy.log" >&2; die "the proxy is not serving version $version after 20 s"; }
  sleep 0.1
done
echo "bench-gateway: ready on 127.0.0.1:$BENCH_GATEWAY_PORT -> $BENCH_UPSTREAM (authentication $auth_mode, config version $version, logs in $work)" >&2

# In the foreground until either child exits or a signal arrives; the EXIT trap stops both.
wait -n "$proxy_pid" "$cp_pid" || true
die "a child exited; stopping"
