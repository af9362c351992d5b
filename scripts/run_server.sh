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
# Default: the example CT (3 labeled axial slices; Auto-segmentation segments the other 27).
# RAGSEG_STUDIES=sample-datasets/synthetic-abdomen: 8 generated subjects, 2 labeled (cross-subject
# demo and active learning), generated on first use.
data="${RAGSEG_STUDIES:-sample-datasets/totalseg-ct}"
case "$data" in
  *synthetic-abdomen*) labels="liver=1,spleen=2,kidney=3" ;;
  *) labels="${RAGSEG_LABELS:-liver=1,spleen=2,kidney_right=3,kidney_left=4}" ;;
esac
if [ ! -d "$data" ]; then
  case "$data" in
    *synthetic-abdomen*) .venv/bin/ragseg sample-data "$data" --subjects 8 --labeled 2 ;;
    *) echo "run_server: no datastore folder at $data" >&2; exit 1 ;;
  esac
fi
export PATH="$root/.venv/bin:$PATH"
exec monailabel start_server --app apps/ragseg --studies "$data" --host 127.0.0.1 --port 8000 \
  --conf labels "$labels" "$@"
