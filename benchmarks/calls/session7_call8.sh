#!/usr/bin/env bash
# Seventh session, call 8: the top-k GPU tests at the session's last kernel commit (the short-rows
# test now runs the three-launch path).
set -u
source benchmarks/calls/env.sh
timeout 280 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "topk or hisa" 2>&1 | tail -3
