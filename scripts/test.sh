#!/usr/bin/env bash
# Set up the virtualenv (cached) and run lint + the whole test suite on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
# this checkout's code, even if the shared venv's editable install points at another clone
export PYTHONPATH="$root/lib${PYTHONPATH:+:$PYTHONPATH}"
py=.venv/bin/python
"$py" -m ruff check lib tests apps scripts
# Threads: the machine has 2 cores; tests set torch threads themselves.
"$py" -m pytest -q -p no:cacheprovider "$@"
