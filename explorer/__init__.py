"""ViT Explorer: see how Vision Transformers tokenise, attend and learn.

Analysis lives in pure modules (tensors in, tensors out); `explorer.plots` turns results
into figures; only `explorer.ui` and `app.py` import gradio.

Importing the package on a machine without an NVIDIA GPU keeps Triton from loading
(`keep_triton_out`), before anything here imports torch.
"""

from __future__ import annotations

import os
import sys


def keep_triton_out() -> bool:
    """Stop Triton from loading where there is no NVIDIA GPU; True if it was stopped.

    PyTorch's CUDA wheels install Triton, the GPU kernel compiler, and ``torch._dynamo``
    (imported by torchvision, timm and accelerate) imports it whenever it is installed: on a
    CPU-only server that is resident memory for a compiler that can never run (measured in
    BENCHMARKS.md, "Session 6"). A ``None`` entry in ``sys.modules`` makes ``import triton``
    raise ImportError, which PyTorch reads as "Triton not installed". Left alone when a GPU
    is present (``/dev/nvidiactl``), when Triton is already loaded, or with
    ``VIT_EXPLORER_TRITON=1``: read here, not from `explorer.settings`, because it must act
    before anything imports torch.
    """
    if (os.environ.get("VIT_EXPLORER_TRITON") == "1" or "triton" in sys.modules
            or os.path.exists("/dev/nvidiactl")):
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True


keep_triton_out()
