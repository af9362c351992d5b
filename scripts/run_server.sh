#!/usr/bin/env bash
# Set up the virtualenv (cached), generate the sample dataset if missing, and start the
# MONAI Label server with the ragseg app on it. Extra arguments go to `monailabel start_server`
# (e.g. --port 8001, --conf k 5, --conf random_weights_for_testing true).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
# this checkout's code, even if the shared venv's editable install points at another clone
export PYTHONPATH="$root/lib${PYTHONPATH:+:$PYTHONPATH}"
data="${RAGSEG_STUDIES:-sample-datasets/synthetic-abdomen}"
if [ ! -d "$data" ]; then
  .venv/bin/ragseg sample-data "$data" --subjects 8 --labeled 2
fi
export PATH="$root/.venv/bin:$PATH"
exec monailabel start_server --app apps/ragseg --studies "$data" --host 127.0.0.1 --port 8000 \
  --conf labels "liver=1,spleen=2,kidney=3" "$@"
