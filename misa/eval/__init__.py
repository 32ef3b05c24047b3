"""Real-model evaluation of MISA on SmolLM2-135M-Instruct with trained DSA indexers.

model.py (find, fetch, load), data.py (corpus, held-out text), indexer.py (the per-layer DSA
indexer, save/load), hooks.py (capture and sparse attention inside transformers), warmup.py
(training), selectors.py + sparse.py (the methods compared, inside the model), recall.py, niah.py,
ppl.py, decode.py (the evaluations), job.py (the GPU job), cli.py (``misa warmup``, ``misa eval``), realdemo.py
(``misa demo``'s real workload).
Heavy dependencies (transformers, gguf, matplotlib) are the ``eval`` extra and load lazily.
"""
