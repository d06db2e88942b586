#!/usr/bin/env bash
# The main job: set up, start the ferstream Serve app on a sample stream, and print its events.
#   ./scripts/demo.sh                        # the looping sample clip from configs/cameras.yaml
#   ./scripts/demo.sh rtsp://host/stream     # any file, RTSP or HTTP(S)/HLS source instead
#   FERSTREAM_DEMO_SECONDS=60 ./scripts/demo.sh   # stop after a minute (default: until Ctrl-C)
# Events are printed as JSON lines by `ferstream tail`; the app's logs go to .demo/serve.log.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

mkdir -p .demo
redis_port="${FERSTREAM_REDIS_PORT:-6379}"
api="http://127.0.0.1:8000"
export FERSTREAM_REDIS_URL="redis://127.0.0.1:$redis_port/0"
pids=()
cleanup() {
  # TERM, not INT: a non-interactive shell starts background jobs with SIGINT ignored. serve run
  # takes its local Ray instance down with it.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill -TERM "${pids[$i]}" 2>/dev/null || true; wait "${pids[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT

if ! redis-cli -p "$redis_port" ping >/dev/null 2>&1; then
  echo "demo: starting redis-server on 127.0.0.1:$redis_port" >&2
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" >.demo/redis.log 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

camera=demo
echo "demo: starting the Serve app (configs/serve-cpu.yaml); logs in .demo/serve.log" >&2
RAY_USAGE_STATS_ENABLED=0 serve run configs/serve-cpu.yaml >.demo/serve.log 2>&1 &
pids+=($!)
for _ in $(seq 300); do
  curl -fsS "$api/healthz" >/dev/null 2>&1 && break
  kill -0 "${pids[-1]}" 2>/dev/null || { tail -30 .demo/serve.log >&2; exit 1; }
  sleep 1
done
curl -fsS "$api/healthz" >/dev/null || { echo "demo: the app did not become healthy" >&2; exit 1; }

source_text="../shared/media/head-pose-face-detection-female-and-male.mp4 (configs/cameras.yaml), a 4.5 s clip looped at 5 frames/s;
             each pass through the clip starts new track ids"
if [ $# -gt 0 ]; then
  camera=cam0
  # The API needs a bearer token when the app has any (FERSTREAM_API_TOKENS in this environment; SECURITY.md).
  auth=()
  [ -n "${FERSTREAM_API_TOKENS:-}" ] && auth=(-H "Authorization: Bearer ${FERSTREAM_API_TOKENS%%,*}")
  curl -fsS -X POST "$api/streams" "${auth[@]}" -H 'content-type: application/json' \
    -d "{\"camera_id\": \"$camera\", \"url\": \"$1\", \"target_fps\": 5, \"loop\": true}" >&2 || true
  echo >&2
  source_text="$(printf '%s' "$1" | sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#'), added through POST /streams, at most 5 frames/s"
fi
models_text="$(python - <<'PY'
from pipeline.config import load_config

config = load_config("configs/pipeline.yaml")
model = config.classifier.checkpoint or "the expression model shipped with ferstream"
print(f"face detector {config.detector.kind}, {model} (configs/pipeline.yaml)")
PY
)"
stop_text="Ctrl-C: stops the app, and the redis-server if this demo started it"
[ -n "${FERSTREAM_DEMO_SECONDS:-}" ] && stop_text="after ${FERSTREAM_DEMO_SECONDS} s (FERSTREAM_DEMO_SECONDS), or $stop_text"
cat >&2 <<BANNER
demo: running
  camera     $camera: $source_text
  models     $models_text, warmed up before the first frame
  API        $api  (curl $api/streams: each camera's state, measured fps, drops, reconnects, last error)
  events     Redis 127.0.0.1:$redis_port, stream ferstream:events:$camera, printed below by \`ferstream tail\`:
             one JSON line per face per processed frame, and every 5 s one summary line per track
  metrics    ray_ferstream_* through Ray's metrics agent (README: Metrics under Serve); app logs in .demo/serve.log
  stop       $stop_text
BANNER
if [ -n "${FERSTREAM_DEMO_SECONDS:-}" ]; then
  timeout --signal INT "$FERSTREAM_DEMO_SECONDS" ferstream tail --camera "$camera" --redis-url "$FERSTREAM_REDIS_URL" || true
else
  ferstream tail --camera "$camera" --redis-url "$FERSTREAM_REDIS_URL"
fi
