#!/usr/bin/env bash
# Every CUDA test and a short `misa bench`, in one call on a GPU machine:
#   bash scripts/gpu_tests.sh
# The CUDA test files are found here: those that ask torch.cuda.is_available(), pick "cuda" or use
# tests/helpers.py's DEVICE or BIG (which pick the card when there is one).
# Full logs go to ${OUT:-/tmp}/gpu-tests.log, the bench JSON to ${OUT:-/tmp}/gpu-bench.json, the
# pytest report to ${OUT:-/tmp}/gpu-tests-junit.xml; the last line printed is one summary:
#   GPU tests: <card> <date> tree <digest> | pytest: N passed, M failed, K skipped | bench: dsa X ms,
#   misa Yx ... | decode: dsa X us, block-pruned Y us, misa-dagger Z us (CUDA graphs)
# <digest> names the code that ran: a hash of the package, tests and scripts as they are on disk (a
# copy of the tree on a GPU machine may carry stale git metadata); `bash scripts/gpu_tests.sh
# --digest` prints it for a checkout.
# Exit status: 0 when every test passed (or skipped) and the bench ran or was skipped for want of
# CUDA; 1 when a test failed or errored, pytest timed out, or the bench failed on a CUDA machine;
# 2 when pytest is missing.
# Needs python3 with torch and triton (PYTHON=... picks another interpreter) and the repo, put on
# PYTHONPATH here; pytest and pytest-xdist come from the machine or, when missing, from wheels in
# .whl/ (python3 -m pip download -d .whl pytest pytest-xdist, carried with the checkout).
# Knobs: PYTEST_TIMEOUT (s, default 420), BENCH_TIMEOUT (s, default 120), PYTEST_ARGS (extra
# arguments, split on spaces), GPU_TEST_FILES (instead of the files found), GPU_TEST_WORKERS
# (pytest processes, default 4; 1 runs them in one), GPU_BENCH=0 (no benches).
# With many workers (GPU_TEST_WORKERS=15 on 16 cores) the suite is meant to fit one 10-minute
# device call; where it does not, run it in two, e.g. GPU_TEST_FILES=tests/test_kernels.py
# GPU_BENCH=0 first, then the other files.
set -uo pipefail
cd "$(dirname "$0")/.."
digest=$(find misa tests scripts -type f \( -name '*.py' -o -name '*.sh' -o -name '*.json' -o -name '*.safetensors' \) \
           -print0 | LC_ALL=C sort -z | xargs -0 sha1sum | sha1sum | cut -c1-12)
if [ "${1:-}" = "--digest" ]; then echo "$digest"; exit 0; fi
PY=${PYTHON:-python3}
DEST=${OUT:-/tmp}
mkdir -p "$DEST"
LOG=$DEST/gpu-tests.log
JSON=$DEST/gpu-bench.json
JUNIT=$DEST/gpu-tests-junit.xml
: > "$LOG"
rm -f "$JSON" "$JUNIT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log() { echo "$@" | tee -a "$LOG"; }

if ! "$PY" -c "import pytest, xdist" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  wheels=(.whl/*.whl)     # the machine's pytest, when it has one, stays: only xdist's wheels then
  "$PY" -c "import pytest" 2>/dev/null && wheels=($(ls .whl/pytest_xdist-*.whl .whl/execnet-*.whl 2>/dev/null))
  log "pytest or pytest-xdist missing: installing ${wheels[*]} into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${wheels[@]}" >>"$LOG" 2>&1
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
# the test files in GPU_TEST_WORKERS processes (default 4) sharing the card, when pytest-xdist is there
workers=()
if "$PY" -c "import xdist" 2>/dev/null && [ "${GPU_TEST_WORKERS:-4}" -gt 1 ]; then
  workers=(-n "${GPU_TEST_WORKERS:-4}")
  # one CPU thread per worker: the float64 references and checks of many processes each spinning
  # up an OpenMP pool over every core ran several times slower than the kernels they check
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>>"$LOG" || echo 0)
if [ -z "$card" ]; then
  card=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" 2>/dev/null || echo "no CUDA")
fi
day=$(date -u +%Y-%m-%dT%H:%MZ)
log "gpu_tests: $card, $day, tree $digest, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+changes')"
"$PY" -c "import sys, torch; import triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"

# --- the CUDA test files ---------------------------------------------------------------------
files=${GPU_TEST_FILES:-$(grep -lE 'torch\.cuda\.is_available|"cuda"|\b(DEVICE|BIG)\b' tests/test_*.py | sort | tr '\n' ' ')}
log "test files: $files"
status=0
if ! "$PY" -c "import pytest" 2>/dev/null; then
  tests="pytest not installed (put its wheels in .whl/)"
  status=2
else
  # SIGINT at the limit: pytest then stops its workers (which would go on using the card under any
  # bench that follows) and still prints the failures so far
  timeout -s INT -k 30 "${PYTEST_TIMEOUT:-420}" "$PY" -m pytest -q -rfEs -p no:cacheprovider --junitxml="$JUNIT" \
    "${workers[@]}" ${PYTEST_ARGS:-} $files >>"$LOG" 2>&1
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    tests="timed out after ${PYTEST_TIMEOUT:-420} s: $(grep -E '^[0-9]+ (passed|failed)' "$LOG" | tail -n1) (see $LOG)"
    status=1
  elif [ -f "$JUNIT" ]; then
    tests=$("$PY" - "$JUNIT" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
out = f"{passed} passed, {n['failures']} failed, {n['skipped']} skipped"
print(out + (f", {n['errors']} errors" if n["errors"] else ""))
sys.exit(1 if n["failures"] or n["errors"] else 0)
EOF
)
    [ $? -ne 0 ] && status=1
    [ $rc -ne 0 ] && [ $rc -ne 5 ] && status=1      # 5: nothing collected
  else
    tests="pytest exited $rc without a report (see $LOG)"
    status=1
  fi
  # the failures and skips, and pytest's last line, on the console too
  sed -n '/short test summary info/,$p' "$LOG" | tail -n 40
fi

# --- a short bench ---------------------------------------------------------------------------
BENCH_ARGS=(--num-queries 1024 --context-lens 16384 32768 --k 2048 --stage1-k 8192 --rep-ms 40 --rounds 2)
if [ "${GPU_BENCH:-1}" = "0" ]; then
  bench="skipped (GPU_BENCH=0)"
elif [ "$cuda" != "1" ]; then
  bench="skipped (no CUDA)"
  log "bench: skipped, no CUDA device"
else
  log "bench: misa bench ${BENCH_ARGS[*]}"
  if "$PY" -c "import rich" 2>/dev/null; then
    timeout "${BENCH_TIMEOUT:-120}" "$PY" -m misa.cli bench "${BENCH_ARGS[@]}" --json "$JSON" >>"$LOG" 2>&1
  else   # the CLI prints with rich; the library call writes the same JSON without it
    timeout "${BENCH_TIMEOUT:-120}" "$PY" - "$JSON" >>"$LOG" 2>&1 <<'EOF'
import sys, torch
from misa.bench import BenchConfig, format_rows, run_bench, save
res = run_bench(BenchConfig(num_queries=1024, context_lens=(16384, 32768), k=2048, stage1_k=8192, rep_ms=40,
                            rounds=2), torch.device("cuda"), progress=False)
cols, rows = format_rows(res)
print(" | ".join(cols))
for r in rows:
    print(" | ".join(r))
save(res, sys.argv[1])
EOF
  fi
  brc=$?
  if [ $brc -eq 0 ] && [ -f "$JSON" ]; then
    bench=$("$PY" - "$JSON" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["rows"][-1]          # the longest context
ms = r["ms"]
parts = [f"{r['seq_len'] // 1024}K keys: dsa {ms['dsa.e2e']:.2f} ms"]
for m, key in (("misa", "misa_e2e"), ("misa-gap", "misa_gap_e2e"), ("misa-dagger", "misa_dagger_e2e"),
               ("hisa", "hisa_e2e")):
    if f"speedup.{key}" in r:
        parts.append(f"{m} {r['speedup.' + key]:.2f}x (recall {r[m + '.recall']:.3f})")
checked = [f"{m} {100 * r[f'overhead.{m}_checked']:+.1f}%" for m in ("dsa", "misa", "hisa")
           if f"overhead.{m}_checked" in r]
if checked:
    parts.append("checked functions over their kernels: " + ", ".join(checked))
print(", ".join(parts))
EOF
)
  else
    bench="failed (exit $brc, see $LOG)"
    status=1
  fi
fi

# --- a short decode bench: dense DSA against block-pruned and MISA-dagger, CUDA graphs ----------
DECODE_JSON=$DEST/gpu-decode.json
if [ "${GPU_BENCH:-1}" = "0" ]; then
  decode="skipped (GPU_BENCH=0)"
elif [ "$cuda" != "1" ]; then
  decode="skipped (no CUDA)"
else
  timeout "${BENCH_TIMEOUT:-120}" "$PY" -m misa.cli bench --decode --decode-shapes 1x4096 64x131072 --next-n 1 \
    --decode-block-k 64 --rep-ms 40 --json "$DECODE_JSON" >>"$LOG" 2>&1
  if [ $? -eq 0 ] && [ -f "$DECODE_JSON" ]; then
    decode=$("$PY" - "$DECODE_JSON" <<'EOF'
import json, sys
parts = []
for r in json.load(open(sys.argv[1]))["rows"]:
    parts.append(f"{r['batch']}x{r['context'] // 1024}K dsa {r['dsa.graph_ms'] * 1e3:.0f} us, block-pruned m=64 "
                 f"{r['hisa-m64.graph_ms'] * 1e3:.0f} us ({r['hisa-m64.speedup']:.1f}x, recall {r['hisa-m64.recall_mean']:.2f}), "
                 f"misa-dagger {r['misa-dagger-h8.graph_ms'] * 1e3:.0f} us (recall {r['misa-dagger-h8.recall_mean']:.2f})")
print("; ".join(parts))
EOF
)
  else
    decode="failed (see $LOG)"
    status=1
  fi
fi

summary="GPU tests: $card $day tree $digest | pytest: $tests | bench: $bench | decode: $decode"
log "$summary"
exit $status
