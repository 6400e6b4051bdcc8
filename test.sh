#!/usr/bin/env bash
# Runs every pullgate test: lints, unit tests, integration tests against an
# in-process fake upstream, and interop tests against the real CNCF
# distribution registry, skopeo and containerd.
#
# The interop tests need the Debian packages docker-registry, skopeo,
# containerd and openssl, the observability tests chromium and prometheus;
# this script installs whichever is missing.
set -euo pipefail
cd "$(dirname "$0")"

need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v skopeo >/dev/null || need+=(skopeo)
{ command -v containerd >/dev/null && command -v ctr >/dev/null; } || need+=(containerd)
command -v openssl >/dev/null || need+=(openssl)
command -v chromium >/dev/null || need+=(chromium)
{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || need+=(prometheus)
if ((${#need[@]})); then
  echo "test.sh: installing ${need[*]} (the interop tests use them)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

echo "test.sh: cargo fmt --check"
cargo fmt --check
echo "test.sh: cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
echo "test.sh: cargo test"
cargo test --quiet
