"""explorer.gpu: ZeroGPU's `spaces.GPU` where the Space has it, the function itself elsewhere."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest
import torch

from explorer import gpu


def square(x):
    return x * x


def count(n):
    yield from range(n)


def test_off_zero_gpu_the_function_is_returned_untouched(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setitem(sys.modules, "spaces", None)  # importing it now would fail
    assert gpu.gpu_task(duration=20)(square) is square
    assert gpu.gpu_task()(count) is count
    monkeypatch.setenv("SPACES_ZERO_GPU", "false")
    assert not gpu.on_zero_gpu() and gpu.gpu_task()(square) is square


def test_the_spaces_package_imports_and_is_inert_on_cpu(monkeypatch):
    """The real package (a dependency): importable, and its decorator a no-op off ZeroGPU."""
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    spaces = pytest.importorskip("spaces")
    assert spaces.GPU(square) is square
    assert spaces.GPU(duration=10)(count) is count


@pytest.fixture
def zero_gpu(monkeypatch):
    """A ZeroGPU environment with a stand-in `spaces` that records the durations asked for."""
    asked = []

    def GPU(task=None, *, duration=None):  # noqa: N802 (spaces' own name)
        def wrap(fn):
            asked.append(duration)
            fn.zerogpu = True
            return fn
        return wrap(task) if callable(task) else wrap

    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    return asked


def test_on_zero_gpu_calls_go_through_spaces_with_their_duration(zero_gpu):
    wrapped = gpu.gpu_task(duration=15)(square)
    assert wrapped is not square and wrapped.zerogpu and zero_gpu == [15]
    assert wrapped(3) == 9 and wrapped.__name__ == "square"
    streamed = gpu.gpu_task(duration=lambda n: n)(count)
    assert list(streamed(3)) == [0, 1, 2] and zero_gpu[-1](7) == 7


def test_on_zero_gpu_results_leave_on_the_cpu(zero_gpu, monkeypatch):
    moved = []
    monkeypatch.setattr(gpu, "to_cpu", lambda v: moved.append(v) or v)
    assert gpu.gpu_task()(square)(2) == 4
    assert list(gpu.gpu_task()(count)(2)) == [0, 1]
    assert moved == [4, 0, 1]  # the result, then each streamed item


@dataclass(frozen=True)
class Result:
    maps: torch.Tensor
    name: str


def test_to_cpu_walks_containers_and_keeps_cpu_values():
    t = torch.ones(2)
    value = {"a": [t, (t, "x")], "r": Result(t, "n"), "n": 3}
    out = gpu.to_cpu(value)
    assert out["a"][0] is t and out["a"][1][0] is t and out["a"][1][1] == "x"
    assert out["r"].maps is t and out["r"].name == "n"
    assert out["n"] == 3 and gpu.to_cpu(value["a"]) is value["a"]  # nothing to move: same list


def first_block_sum(model, pixels, scale=1.0):
    return {"out": model(pixels) * scale, "where": str(pixels.device)}


def test_an_analysis_off_zero_gpu_is_the_plain_call_on_the_models_device(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    model, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    got = gpu.analyse_on_device(first_block_sum, model, x, scale=2.0)
    assert torch.equal(got["out"], model(x) * 2.0) and got["where"] == "cpu"
    assert gpu.analyse_on_device is gpu._analyse_on_device  # no wrapper off ZeroGPU


def test_an_analysis_on_zero_gpu_goes_through_spaces_with_the_analysis_duration(zero_gpu):
    model, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    wrapped = gpu.gpu_task(duration=gpu.ANALYSIS_SECONDS)(gpu._analyse_on_device)
    got = wrapped(first_block_sum, model, x)
    assert zero_gpu == [gpu.ANALYSIS_SECONDS] and gpu.ANALYSIS_SECONDS < 60
    assert torch.equal(got["out"], model(x)) and got["out"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_in_a_zero_gpu_worker_the_analysis_runs_on_cuda_and_leaves_the_model_on_the_cpu(
        zero_gpu):
    model, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    wrapped = gpu.gpu_task(duration=gpu.ANALYSIS_SECONDS)(gpu._analyse_on_device)
    got = wrapped(first_block_sum, model, x)
    assert got["where"].startswith("cuda") and got["out"].device.type == "cpu"
    assert next(model.parameters()).device.type == "cpu"
    torch.testing.assert_close(got["out"], model(x))


def test_on_zero_gpu_the_app_process_never_places_anything_on_cuda(monkeypatch):
    """CUDA must not start in a ZeroGPU Space's own process (its `torch.cuda.is_available`
    says True there): models load on the CPU, training runs on the CPU in fp32."""
    from explorer import models, training
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as spaces patches it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert training.resolve_mixed_precision("auto") == "bf16"  # a dedicated GPU
    assert models.default_device().type == "cuda"
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert models.default_device().type == "cpu"
    assert training.resolve_mixed_precision("auto") == "no"


def test_every_vit_analysis_of_the_tabs_goes_through_the_gpu_seam(monkeypatch):
    """The tokens, attention and distance tabs' forward passes each go through
    `analyse_on_device` (a spaces.GPU call on ZeroGPU), on the real offline model."""
    from explorer import distance, images
    from explorer.ui import attention_tab, common, distance_tab, tokens_tab
    called = []

    def seam(fn, model, *args, **kwargs):
        called.append(fn.__name__)
        return gpu._analyse_on_device(fn, model, *args, **kwargs)

    monkeypatch.setattr(gpu, "analyse_on_device", seam)
    distance.RANDOM_INIT_CURVES.clear()
    photo = str(images.example_paths()[0])
    tokens_tab._tokens(photo, None, 224, 224, "crop")
    assert called == ["analyse_tokenization"]
    attention_tab._analyse(common.ImageRequest(photo, None, 224, 224, "crop"))
    assert called[1:] == ["shared_capture"]  # the offline DINOv2 has no classifier: no relevance
    called.clear()
    distance_tab.per_image(photo, None, [], True, False, 224, 224, "crop", "drop", None)
    assert called == ["model_mean_attention_distance"] * 2  # the image, then random init
