#!/usr/bin/env bash
# The main job: set up, then run ferstream on a sample stream and print its events as JSON lines.
#   ./scripts/demo.sh                      # the looping sample clip from configs/demo.yaml
#   ./scripts/demo.sh rtsp://host/stream   # any file, RTSP or HTTP(S)/HLS source instead
# Extra flags after the source go to `ferstream run` (e.g. --max-seconds 30).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

source_args=()
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then
  source_args=(--source "$1" --loop)
  shift
fi

redis_port="${FERSTREAM_REDIS_PORT:-6379}"
if ! redis-cli -p "$redis_port" ping >/dev/null 2>&1; then
  echo "demo: starting redis-server on 127.0.0.1:$redis_port" >&2
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --daemonize no >/dev/null &
  redis_pid=$!
  trap 'kill $redis_pid 2>/dev/null || true' EXIT
  for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

ferstream run --config configs/demo.yaml --redis-url "redis://127.0.0.1:$redis_port/0" --print-events "${source_args[@]}" "$@"
