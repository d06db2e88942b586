#!/usr/bin/env bash
# Set up, lint, and run the whole test suite (unit and integration; the tests start their own servers).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
ruff format --check .
pytest -q -rs "$@"
