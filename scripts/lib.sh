# Shared settings for tug's scripts. Sourced, not run.
#
# Everything the test substrate owns lives under TUG_TEST_STATE (persistent: containerd's content,
# the registry's blobs, built images) and TUG_TEST_RUN (sockets and pid files), never in the host's
# /var/lib/containerd or /run/containerd. The Rust test harness (tests/src/substrate.rs) reads the same
# variables with the same defaults.

set -euo pipefail

TUG_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export TUG_ROOT
export TUG_TEST_STATE=${TUG_TEST_STATE:-/var/lib/tug-test}
export TUG_TEST_RUN=${TUG_TEST_RUN:-/run/tug-test}
export TUG_TEST_CONTAINERD_SOCK=${TUG_TEST_CONTAINERD_SOCK:-$TUG_TEST_RUN/containerd/containerd.sock}
export TUG_TEST_REGISTRY=${TUG_TEST_REGISTRY:-127.0.0.1:5000}
export TUG_TEST_IMAGES=${TUG_TEST_IMAGES:-$TUG_TEST_STATE/images}

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

require_root() {
  [ "$(id -u)" -eq 0 ] || die "$1 needs root (it installs packages, starts containerd and creates network namespaces); run it with sudo"
}

# Polls a command until it succeeds or the deadline (seconds) passes.
wait_for() {
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
  log "$what is up"
}
