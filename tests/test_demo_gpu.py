"""``misa demo``'s real-workload settings on the GPU kernels: every row of the multi-layer table,
the calibrated one included, against the PyTorch reference on the same inputs; and the default
``misa demo`` on CUDA end to end when the model is on the machine."""
import pytest
import torch

import misa
from misa.demo import CALIBRATED, run_demo
from misa.synthetic import indexer_workload
from misa.variants import method_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class _Layers:
    def __init__(self, layers):
        self.layers = layers


def test_real_demo_settings_on_the_kernels_match_the_reference():
    from misa.eval.realdemo import real_config
    device = torch.device("cuda")
    cfg = real_config(device)                     # the GPU defaults: 8192 keys, 2048 queries, k = 256
    cfg.num_queries = 1000                        # not a multiple of any block
    # the shipped indexer's shape: 64 heads x 64 dims; a context that is no multiple of 128 either
    layers = {layer: indexer_workload(cfg.seq_len - 37, cfg.num_queries, 64, 64, seed=layer, device=device).args
              for layer in (3, 15, 27)}
    config = misa.MisaConfig(variant="dsa", layers=(
        (3, misa.MisaConfig(variant="misa", active_heads=4, router="gap", block_size=128)),
        (15, misa.MisaConfig(variant="misa-dagger", active_heads=8, router="gap", block_size=128,
                                  stage1_k=4 * cfg.k)),
        (27, misa.MisaConfig(variant="hisa", hisa_block_size=64, hisa_block_k=16))))
    rows = {r.name: r for r in run_demo(cfg, device, workload=_Layers(layers), config=config)}
    assert rows["dsa"].recall_min == 1.0
    for layer, args in layers.items():
        dsa = misa.dsa_select(*args, k=cfg.k, backend="reference")
        want = {name: method_config(name, **cfg.sizes(), backend="reference") for name in rows if name != CALIBRATED}
        want[CALIBRATED] = config.for_layer(layer).with_options(backend="reference")
        for name, row in rows.items():
            r = misa.recall(want[name].select(*args, cfg.k), dsa)
            # the kernels and the reference may order fp8 ties differently: a few tokens in 256
            assert abs(row.layer_recall[layer] - float(r.mean())) <= 0.01, (name, layer)
    assert rows[CALIBRATED].layer_recall[3] < 1.0 and rows[CALIBRATED].layer_settings[15] == \
        ("MISA\u2020 (gap)", "h=8, B=128, k1=1024")


def test_default_demo_on_cuda_is_the_real_model(capsys):
    from helpers import real_model_skip_reason
    from misa.cli import main
    from misa.eval.realdemo import SHIPPED_INDEXER
    pytest.importorskip("transformers")
    why = real_model_skip_reason()
    if why:
        pytest.skip(why)
    if not (SHIPPED_INDEXER / "indexer.json").is_file():
        pytest.skip(f"no shipped indexer in {SHIPPED_INDEXER}")
    assert main(["demo", "--device", "cuda", "--workload", "real"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "REAL SmolLM2-135M-Instruct, layers" in out and "8192-token context, top-k = 256" in out
    assert "calibrated" in out and "kernel compilation" in out
