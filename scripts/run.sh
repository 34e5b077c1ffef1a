#!/usr/bin/env bash
# The all-in-one gateway of the README's quick start: the control plane on its embedded store
# (no etcd needed), data under .data/. Ctrl-C (or SIGTERM) drains and stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/bootstrap.sh
cargo build --release --bins
mkdir -p .data
echo "portcullis: admin API on 127.0.0.1:7070 — try: target/release/portctl apply -f deploy/examples/ && target/release/portctl get routes" >&2
exec target/release/portcullis-control-plane --store embedded --data-dir .data/control-plane "$@"
