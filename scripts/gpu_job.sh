#!/usr/bin/env bash
# The real-model evaluation on a GPU machine (no internet), as two commands of < 10 minutes each:
#   bash scripts/gpu_job.sh train MINUTES [job options]   # indexer warm-up, time-bounded
#   bash scripts/gpu_job.sh eval  MINUTES [job options]   # recall + router study + ppl + NIAH + decode
# Both resume from $MISA_RUN (default /tmp/misa-run); files worth keeping are copied to $OUT.
# train --max-steps N trains exactly N steps whatever MINUTES (the schedule planned over the steps):
# MINUTES no longer stops it, so keep N within the machine's 10 minutes per command.
# The CUDA tests and a short bench are scripts/gpu_tests.sh.
# Needs: the gguf wheel in .whl/ (python3 -m pip download --no-deps -d .whl gguf), and the model,
# either at $MISA_MODEL, or at /tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf, or as the parts
# /tmp/stage/part.1, part.2 that shared/tools/split-for-device made (assembled and checked here
# against .device/smollm2/SHA256 when that file was carried); and the texts, since shared/ does not
# travel: a copy of shared/data/text carried as .device/text, kept in $MISA_RUN/text for the next call.
set -euo pipefail
phase=${1:?usage: gpu_job.sh train|eval MINUTES [options]}
minutes=${2:?usage: gpu_job.sh train|eval MINUTES [options]}
shift 2
cd "$(dirname "$0")/.."
RUN=${MISA_RUN:-/tmp/misa-run}
OUT=${OUT:-$RUN/out}
mkdir -p "$RUN" "$OUT"
if ! python3 -c "import gguf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/gguf-*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
STAGE=${MISA_STAGE:-/tmp/stage}
MODEL=${MISA_MODEL:-$STAGE/$NAME}
if [ ! -f "$MODEL" ] && ls "$STAGE"/part.* >/dev/null 2>&1; then
  cat $(ls "$STAGE"/part.* | sort -t. -k2 -n) > "$MODEL.tmp" && mv "$MODEL.tmp" "$MODEL"
fi
[ -f "$MODEL" ] || { echo "gpu_job: no model at $MODEL (stage the parts first)"; exit 2; }
if [ -f .device/smollm2/SHA256 ]; then
  echo "$(cat .device/smollm2/SHA256)  $MODEL" | sha256sum -c --quiet || { echo "gpu_job: model checksum mismatch"; exit 2; }
fi
if [ -d .device/text ]; then mkdir -p "$RUN/text" && cp .device/text/*.txt "$RUN/text/"; fi
[ -d "$RUN/text" ] && export MISA_CORPUS=$RUN/text
echo "corpus: ${MISA_CORPUS:-default}; $(ls ${MISA_CORPUS:-/nonexistent} 2>/dev/null | wc -l) files"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MISA_CACHE=$RUN/cache
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
exec python3 -m misa.eval.job "$phase" --model "$MODEL" --run-dir "$RUN" --out "$OUT" --minutes "$minutes" --no-progress "$@"
