#!/usr/bin/env bash
# Installs what building and testing Portcullis needs on a fresh Debian 12 machine, and nothing
# that is already there:
#   - protoc-bin-vendored (a protoc shipped in a crate; etcd-client's and our build scripts need
#     a protoc, see .cargo/config.toml) via `cargo install`;
#   - etcd (Debian's etcd-server) for the integration tests, only with --with-etcd.
set -euo pipefail

with_etcd=0
[ "${1:-}" = --with-etcd ] && with_etcd=1

if ! command -v protoc-bin-vendored >/dev/null 2>&1; then
  echo "bootstrap: installing protoc-bin-vendored" >&2
  cargo install --locked --quiet protoc-bin-vendored@3.3.0
fi

if [ "$with_etcd" = 1 ] && ! command -v etcd >/dev/null 2>&1 && [ ! -x /usr/bin/etcd ]; then
  echo "bootstrap: installing etcd (Debian etcd-server)" >&2
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
fi
