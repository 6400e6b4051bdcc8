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
command -v htpasswd >/dev/null || need+=(apache2-utils)
command -v curl >/dev/null || need+=(curl)
command -v chromium >/dev/null || need+=(chromium)
{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || need+=(prometheus)
if ((${#need[@]})); then
  echo "test.sh: installing ${need[*]} (the interop tests use them)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # The tests start and stop these programs themselves. The packages would
  # also start services (docker-registry on :5000 and prometheus on :9090,
  # pullgate's own ports; containerd): a policy-rc.d keeps them from
  # starting during the install, and what they enabled is disabled after.
  policy=/usr/sbin/policy-rc.d
  created_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# test.sh: no service starts while it installs packages\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
    created_policy=1
    trap '$sudo rm -f "$policy"' EXIT
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
  [ -n "$created_policy" ] && $sudo rm -f "$policy" && trap - EXIT
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    for pkg in "${need[@]}"; do
      case $pkg in
        docker-registry) unit=docker-registry ;;
        prometheus) unit=prometheus ;;
        containerd) unit=containerd ;;
        *) continue ;;
      esac
      echo "test.sh: disabling $unit.service, which the $pkg package enabled"
      $sudo systemctl disable --now "$unit.service" >/dev/null 2>&1 || true
    done
  fi
fi

echo "test.sh: cargo fmt --check"
cargo fmt --check
echo "test.sh: cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
echo "test.sh: cargo test"
cargo test --quiet
