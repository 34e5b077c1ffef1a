#!/usr/bin/env bash
# The test command of the README: installs what the tests need (protoc, etcd), builds the
# binaries the end-to-end suites run, and runs every test of the workspace. The suites start
# their own etcd servers (on free loopback ports, fresh data dirs) and stop them.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/bootstrap.sh --with-etcd
export RUST_BACKTRACE=0   # expected failures in negative tests should not flood the log

cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
