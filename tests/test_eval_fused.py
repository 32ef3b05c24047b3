"""The fused Triton indexer-training kernels against the eager formula, in Triton's CPU interpreter
(a subprocess, since TRITON_INTERPRET must be set before the kernels are defined). On CUDA the
warm-up re-checks them on its first batch before trusting them."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    from misa.eval.fused import fused_logits
    from misa.eval.indexer import indexer_logits
    torch.manual_seed(0)
    for t, h, d, dt in [(70, 4, 16, torch.float32), (130, 8, 32, torch.float32), (100, 8, 64, torch.float16)]:
        q = torch.randn(t, h, d).to(dt).requires_grad_()
        k = torch.randn(t, d).to(dt).requires_grad_()
        w = torch.randn(t, h, requires_grad=True)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        got = fused_logits(q, k, w)
        assert torch.equal(torch.isinf(got), ~causal)
        want = indexer_logits(q.float(), k.float(), w).masked_fill(~causal, float("-inf"))
        scale = want[causal].abs().max()
        assert float((got - want)[causal].abs().max() / scale) < 1e-3, (t, dt)
        g = torch.randn(t, t) * causal
        (got.masked_fill(~causal, 0) * g).sum().backward()
        fused = [x.grad.float().clone() for x in (q, k, w)]
        for x in (q, k, w):
            x.grad = None
        qf, kf = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
        (indexer_logits(qf, kf, w).masked_fill(~causal, 0) * g).sum().backward()
        for a, b in zip(fused, (qf.grad, kf.grad, w.grad)):
            assert float((a - b).abs().max() / b.abs().max()) < 1e-2, (t, dt)
    print("OK")
""")


def test_fused_kernels_match_eager_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
