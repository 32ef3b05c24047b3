import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

try:
    import torch
    if not torch.cuda.is_available():
        # kernels run through Triton's CPU interpreter; must be set before triton.jit runs
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
