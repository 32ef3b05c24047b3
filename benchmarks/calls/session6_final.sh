#!/usr/bin/env bash
# Sixth session, final device call: misa bench at the session's kernels, then the GPU tests in two
# processes (their time is mostly Triton compiles).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
timeout 230 python3 -m misa.cli bench --json $OUT/bench.json --rep-ms 60 2>&1 | tail -3
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
python3 - <<'PY'
import json, os
for r in json.load(open(os.environ["OUT"] + "/bench.json"))["rows"]:
    m = r["ms"]
    print(r["seq_len"], {k: round(v, 3) for k, v in m.items()})
    print("   x", {k[8:]: round(v, 2) for k, v in r.items() if k.startswith("speedup.")})
    print("   rounds", {k: [round(x, 3) for x in v] for k, v in r["ms_rounds"].items() if k in ("dsa.logits", "misa.logits", "misa.router")})
PY
timeout ${TEST_S:-300} python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py -k topk > $OUT/pytest_topk.log 2>&1 &
timeout ${TEST_S:-300} python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_paged_kernel.py \
  tests/test_gpu_integration.py tests/test_bench.py -k "not topk" > $OUT/pytest_rest.log 2>&1
wait
for f in $OUT/pytest_topk.log $OUT/pytest_rest.log; do tail -n 2 "$f"; grep -E "^(FAILED|ERROR)" "$f" | head; done
