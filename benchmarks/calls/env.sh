# Sourced by the device-call scripts here: the carried wheels (pytest, rich, ...) and this tree on
# PYTHONPATH, unbuffered output.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
