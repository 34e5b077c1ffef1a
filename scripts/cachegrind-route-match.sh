#!/usr/bin/env bash
# Per-lookup instructions and simulated cache misses of the route_match bench's lookups, a
# figure the shared machine's load does not move: runs the bench binary's counting mode
# (ROUTE_MATCH_COUNT) under cachegrind with K lookups and with none, and prints the difference
# divided by K.
#
# usage: scripts/cachegrind-route-match.sh [ROUTES] [LOOKUPS] [LL_BYTES]
#   ROUTES   table size (default 100000); LOOKUPS (default 20000)
#   LL_BYTES last-level cache simulated (default 4194304: what a busy 2-core share of L3 is
#            more like than the whole 32 MiB); D1 is 32 KiB, 8-way.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100000}; k=${2:-20000}; ll=${3:-4194304}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
bin=$(cargo bench -p portcullis-data-plane --bench route_match --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="route_match" and m.get("executable"): print(m["executable"])' | tail -1)
[ -n "$bin" ] || { echo "the route_match bench did not build: cargo bench -p portcullis-data-plane --bench route_match --no-run" >&2; exit 1; }
run() {
  ROUTE_MATCH_COUNT="$n $1" valgrind --tool=cachegrind --cache-sim=yes --D1=32768,8,64 --LL="$ll,16,64" \
    --cachegrind-out-file=/dev/null "$bin" 2>&1 |
    awk '/I *refs:/ {gsub(",","",$NF); i=$NF} /D1  misses:/ {gsub(",","",$4); d=$4} /LLd misses:/ {gsub(",","",$4); l=$4} END {print i, d, l}'
}
read -r i1 d1 l1 < <(run "$k")
read -r i0 d0 l0 < <(run 0)
python3 -c "k=$k; print(f'route_match, $n routes, per lookup: {($i1-$i0)/k:.0f} instructions, {($d1-$d0)/k:.2f} D1 misses, {($l1-$l0)/k:.2f} LL misses (LL = {$ll/1048576:g} MiB)')"
