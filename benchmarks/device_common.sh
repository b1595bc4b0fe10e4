# What the scripts for a lent accelerator share (sourced by device_check.sh and recipes_check.sh):
# the output folder and its log.txt, PYTHONPATH=. (the package need not be installed), an empty compilation
# cache, ml-collections
# from wheels in .whl/ when missing, and step(), which runs one part within the time BUDGET.
#
# Before sourcing: OUT (the output folder) and BUDGET (seconds for the whole script).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/log.txt"
: >"$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# train.py and sample.py keep compiled programs in $XDG_CACHE_HOME/vdm/xla: a fresh folder for each run of
# the script, so its first calls and wall times are a fresh machine's, whatever ran before on this one.
export XDG_CACHE_HOME=$(mktemp -d)
unset JAX_COMPILATION_CACHE_DIR
PY=${PYTHON:-python3}

if ! $PY -c "import ml_collections" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/vdm-site .whl/*.whl >>"$LOG" 2>&1
    export PYTHONPATH="$PYTHONPATH:/tmp/vdm-site"
  fi
  $PY -c "import ml_collections" 2>/dev/null || {
    echo "$(basename "$0"): ml-collections is missing: make wheels where pip works with"
    echo "  pip download --no-deps --only-binary=:all: -d .whl ml-collections"
    echo "and bring .whl/ along"; exit 2; }
fi

step() {  # step NAME TIMEOUT_S COMMAND…: runs one part within what is left of BUDGET, logs it, goes on if it fails
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS - 10))
  if ((left < 15)); then echo "== $name: skipped (budget spent)" | tee -a "$LOG"; return; fi
  ((limit > left)) && limit=$left
  echo "== $name (limit $limit s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}
