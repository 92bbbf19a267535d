"""explorer.kernels: the compiled attention kernel's build, its fallback and its block plan."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from explorer import kernels
from explorer.attention import capture, native
from tests.kernel_helpers import needs_compiler

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("batch", "tokens", "threads", "rows"),
    [
        (1, 1370, 1, 92),   # 518 px: 512 KB / (1370 * 4 B) = 95 rows -> 15 blocks of 92
        (1, 1370, 2, 86),   # 15 blocks -> 16 so both threads get 8
        (1, 257, 1, 86),    # 224 px: a whole image fits, but 3 blocks per thread -> 3 of 86
        (1, 257, 2, 43),    # 6 blocks of 43, 3 per thread
        (32, 257, 2, 257),  # a batch: one image per block is already 16 per thread
        (3, 5, 4, 2),       # tiny: 4 blocks of 2 rows (12 tasks, 3 per thread)
    ],
)
def test_block_plan(batch, tokens, threads, rows):
    assert native.block_rows(batch, tokens, 4, threads) == rows
    blocks = -(-tokens // rows)
    assert blocks * rows >= tokens and (blocks - 1) * rows < tokens


def test_build_directory_depends_on_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLORER_KERNEL_CACHE", str(tmp_path))
    directory = kernels.build_directory()
    assert directory.parent == tmp_path and directory.name.startswith("kernels-")
    monkeypatch.setattr(kernels, "_cpu_key", lambda: "flags : other cpu")
    assert kernels.build_directory() != directory  # -march=native code is per CPU


def test_switched_off_means_no_kernel(monkeypatch):
    monkeypatch.setenv("EXPLORER_NATIVE", "0")
    assert kernels.attend_op() is None


def test_failed_build_falls_back_to_pytorch_ops(tmp_path):
    """No usable compiler (a fresh cache, CXX pointing nowhere): a warning, no kernel, and
    attention maps that still match the eager formula."""
    code = (
        "import torch, timm\n"
        "from explorer import kernels\n"
        "from explorer.attention import capture, native\n"
        "assert not native.available(), 'kernel built with no compiler?'\n"
        "assert kernels.build_error(), 'no reason recorded'\n"
        "torch.manual_seed(0)\n"
        "m = timm.create_model('vit_small_patch16_224', pretrained=False, img_size=32,\n"
        "                      embed_dim=32, depth=2, num_heads=2).eval()\n"
        "maps = capture(m, torch.randn(1, 3, 32, 32))\n"
        "p = maps.probs(1)\n"
        "assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-6)\n"
        "print('fallback ok')\n"
    )
    env = dict(os.environ, EXPLORER_KERNEL_CACHE=str(tmp_path), CXX=str(tmp_path / "no-cxx"),
               PYTHONPATH=str(ROOT))
    env.pop("EXPLORER_NATIVE", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fallback ok" in done.stdout
    assert "Native kernels unavailable" in done.stderr


@needs_compiler
def test_concurrent_captures_with_the_kernel_agree():
    """Two Gradio-like worker threads capturing at once through one shared model: each gets
    its own maps (before the per-thread routing, the second capture's patch replaced the
    first's, which then captured 0 blocks and raised), and nothing is left on the model."""
    torch.manual_seed(0)
    import timm

    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=96,
                              embed_dim=64, depth=3, num_heads=4, dynamic_img_size=True).eval()
    pixels = [torch.randn(1, 3, 96, 96), torch.randn(2, 3, 64, 112)]
    alone = [capture(model, x) for x in pixels]
    got: list = [None, None]

    start = threading.Barrier(2)

    def run(i):
        start.wait()
        for _ in range(5):
            got[i] = capture(model, pixels[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all("forward" not in vars(blk.attn) for blk in model.blocks)
    for a, b in zip(alone, got, strict=True):
        torch.testing.assert_close(torch.stack(b.head_mean), torch.stack(a.head_mean),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(b.features, a.features, atol=1e-5, rtol=0)
