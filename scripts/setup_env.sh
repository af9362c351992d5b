#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install the project into it.
#
# The venv lives in a cache directory keyed by the hash of requirements.txt and this script, so
# re-runs, fresh clones and CI on the same machine reuse it; `.venv` in the repo points at it.
# Usage: source-free; prints nothing but progress. Env:
#   RAGSEG_VENV_CACHE  where venvs are kept (default ~/.cache/ragseg/venvs)
#   PYTHON             interpreter to build the venv with (default python3.11, else python3)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

py="${PYTHON:-}"
if [ -z "$py" ]; then
  if command -v python3.11 >/dev/null 2>&1; then py=python3.11; else py=python3; fi
fi
"$py" - <<'PY' || { echo "setup_env: Python 3.11 is required (found $("$py" --version 2>&1))" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)
PY

key="$(cat requirements.txt scripts/setup_env.sh | sha256sum | cut -c1-16)"
cache="${RAGSEG_VENV_CACHE:-$HOME/.cache/ragseg/venvs}"
venv="$cache/$key"
mkdir -p "$cache"

# One installer at a time per cache (a developer's shell and CI may share the machine).
exec 9>"$cache/.lock"
flock 9

if [ ! -f "$venv/.complete" ]; then
  echo "setup_env: building virtualenv $venv (first run takes several minutes: torch is large)"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install --progress-bar off)
  "${pip[@]}" --upgrade "pip>=24" "setuptools>=70" wheel
  # torch first: sam2 builds against the installed torch (no build isolation) and must not
  # pull a different one; SAM2_BUILD_CUDA=0 skips the CUDA extension (no nvcc needed).
  "${pip[@]}" "$(grep -E '^torch==' requirements.txt)" "$(grep -E '^torchvision==' requirements.txt)" \
    "$(grep -E '^numpy' requirements.txt)"
  SAM2_BUILD_CUDA=0 "${pip[@]}" --no-build-isolation "sam2==1.1.0"
  "${pip[@]}" -r requirements.txt
  touch "$venv/.complete"
fi

# Editable install of this checkout (cheap; re-done so the venv points at this clone).
"$venv/bin/python" -m pip install --progress-bar off --quiet --no-deps --no-build-isolation -e "$root"
ln -sfn "$venv" "$root/.venv"
echo "setup_env: ready ($root/.venv -> $venv)"
