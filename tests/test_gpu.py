"""explorer.gpu: ZeroGPU's `spaces.GPU` where the Space has it, the function itself elsewhere."""

from __future__ import annotations

import copy
import functools
import importlib.machinery
import inspect
import io
import multiprocessing
import pathlib
import pickle
import sys
import threading
import traceback
import types
from dataclasses import dataclass, field, replace

import gradio as gr
import pytest
import timm
import torch
import torch.nn.functional as F

from explorer import datasets, gpu


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


# -- a stand-in for `spaces` on a ZeroGPU Space --------------------------------------------


class _Boundary(pickle.Pickler):
    """Pickles what crosses ZeroGPU's process boundary; a tensor off the CPU is refused (the
    app's process would have to start CUDA to take it)."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
            raise pickle.PicklingError(f"a {obj.device.type} tensor crossed to the app")
        return NotImplemented


def _dumps(obj) -> bytes:
    buffer = io.BytesIO()
    _Boundary(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _failure(err: Exception) -> bytes:
    """What spaces' worker sends for an exception (``exception_result`` in
    spaces/zero/wrappers.py): a `gr.Error` as it is, any other by its class name only, and
    its traceback, which the app prints."""
    return _dumps(("error", (err if isinstance(err, gr.Error) else None, type(err).__name__,
                             "".join(traceback.format_exception(err)))))


def _raise_failure(gradio_error, error_cls: str, worker_traceback: str):
    """The app's side of a failed call, as spaces' handler: a `gr.Error` raised as it is (its
    traceback printed when it asks for it); any other exception replaced by a generic
    ``gr.Error(<class name>, title="ZeroGPU worker error")``, its traceback printed."""
    if gradio_error is None or gradio_error.print_exception:
        print(worker_traceback)
    if gradio_error is not None:
        gradio_error.print_exception = False
        raise gradio_error
    raise gr.Error(error_cls, title="ZeroGPU worker error", print_exception=False)


def _worker(fn, conn, stop, real_cuda):
    """The forked worker, as spaces' ``thread_wrapper``: torch.cuda as it really is (spaces'
    ``torch.unpatch``), the arguments unpickled, the call run, the result or each item
    pickled back (an exception as spaces sends it: `_failure`; one that cannot be pickled is
    a PicklingError, as spaces' queue makes it); a streamed call stops at the next yield once
    the app has closed its stream (``stop_event``: ``gen.close()``)."""
    torch.cuda.is_available, torch.cuda._lazy_init = real_cuda
    torch.set_num_threads(1)  # as DataLoader's workers: the parent's OpenMP pool is not ours
    args, kwargs = pickle.loads(conn.recv_bytes())
    if not inspect.isgeneratorfunction(fn):
        try:
            payload = _dumps(("ok", fn(*args, **kwargs)))
        except Exception as err:
            payload = _failure(err)
        try:
            conn.send_bytes(payload)
        except Exception as err:
            conn.send_bytes(_failure(pickle.PicklingError(str(err))))
        return
    gen, sent, end = fn(*args, **kwargs), 0, "exhausted"
    while True:
        try:
            item = next(gen)
        except StopIteration:
            break
        except Exception as err:
            try:
                conn.send_bytes(_failure(err))
            except Exception as unpicklable:
                conn.send_bytes(_failure(pickle.PicklingError(str(unpicklable))))
            end = "error"
            break
        if stop.is_set():
            try:
                gen.close()
                end = "closed"
            except BaseException as err:  # e.g. a generator that yields on GeneratorExit
                end = f"close failed: {err!r}"
            break
        try:
            payload = _dumps(("item", item))
        except Exception as err:
            conn.send_bytes(_failure(pickle.PicklingError(str(err))))
            end = "error"
            break
        conn.send_bytes(payload)
        sent += 1
    conn.send_bytes(_dumps(("end", {"end": end, "sent": sent})))


@dataclass
class StandIn:
    """What the stand-in saw: each decorated function's declared duration, and per call the
    seconds asked for, the items its worker sent and how its generator ended."""

    real_cuda: tuple
    declared: list = field(default_factory=list)
    calls: list = field(default_factory=list)

    def GPU(self, task=None, *, duration=None):  # noqa: N802 (spaces' own name)
        def wrap(fn):
            self.declared.append(duration)
            handler = self._stream(fn, duration) if inspect.isgeneratorfunction(fn) else (
                self._call(fn, duration))
            handler = functools.wraps(fn)(handler)
            handler.zerogpu = True
            return handler
        return wrap(task) if callable(task) else wrap

    def _start(self, fn, duration, args, kwargs):
        assert not torch.cuda.is_initialized(), "CUDA started in the app: the fork would fail"
        seconds = duration(*args, **kwargs) if callable(duration) else duration
        record = {"seconds": seconds, "sent": 0, "end": None}
        self.calls.append(record)
        payload = _dumps((args, kwargs))  # a lock, an Event or a CUDA tensor fails here
        ctx = multiprocessing.get_context("fork")
        here, there = ctx.Pipe()
        stop = ctx.Event()
        process = ctx.Process(target=_worker, args=(fn, there, stop, self.real_cuda),
                              daemon=True)
        process.start()
        there.close()
        here.send_bytes(payload)
        return here, process, stop, record

    def _call(self, fn, duration):
        def call(*args, **kwargs):
            here, process, _, _ = self._start(fn, duration, args, kwargs)
            kind, value = pickle.loads(here.recv_bytes())
            process.join()
            if kind == "error":
                _raise_failure(*value)
            return value
        return call

    def _stream(self, fn, duration):
        def stream(*args, **kwargs):
            here, process, stop, record = self._start(fn, duration, args, kwargs)
            try:
                while True:
                    kind, value = pickle.loads(here.recv_bytes())
                    if kind == "item":
                        try:
                            yield value
                        except GeneratorExit:
                            stop.set()
                            raise
                    elif kind == "error":
                        _raise_failure(*value)
                    else:
                        record.update(value)
                        return
            finally:  # as spaces' handler: back only once the worker's generator has ended
                while record["end"] is None and here.poll(120):
                    kind, value = pickle.loads(here.recv_bytes())
                    if kind == "end":
                        record.update(value)
                process.join(30)
        return stream


@pytest.fixture
def zero_gpu(monkeypatch):
    """A ZeroGPU Space, with a stand-in `spaces` as faithful as these tests need: every call
    runs in a forked worker; its arguments, result and streamed items are pickled across (a
    CUDA tensor, a lock or an Event fails as there); an exception raised there comes back
    as spaces sends it (a `gr.Error` as it is, any other as a generic "ZeroGPU worker
    error"); a stream closed by the app is closed in the worker at its next yield; the app's
    `torch.cuda.is_available()` says True (as spaces patches it) but starting CUDA in the app
    fails the test. The module's GPU calls are
    decorated again, as an import on a ZeroGPU Space would."""
    stand_in = StandIn(real_cuda=(torch.cuda.is_available, torch.cuda._lazy_init))

    def cuda_in_the_app(*args, **kwargs):
        raise AssertionError("CUDA started in the app's process")

    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=stand_in.GPU))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "_lazy_init", cuda_in_the_app)
    monkeypatch.setattr(gpu, "analyse_on_device",
                        gpu.gpu_task(duration=gpu.ANALYSIS_SECONDS)(gpu._analyse_on_device))
    monkeypatch.setattr(gpu, "_worker_stream",
                        gpu.gpu_task(duration=gpu._asked_seconds)(gpu._run_in_worker))
    return stand_in


def test_on_zero_gpu_calls_go_through_spaces_with_their_duration(zero_gpu):
    wrapped = gpu.gpu_task(duration=15)(square)
    assert wrapped is not square and wrapped.zerogpu and zero_gpu.declared[-1] == 15
    assert wrapped(3) == 9 and wrapped.__name__ == "square"
    streamed = gpu.gpu_task(duration=lambda n: n)(count)
    assert list(streamed(3)) == [0, 1, 2] and zero_gpu.declared[-1](7) == 7
    assert [c["seconds"] for c in zero_gpu.calls] == [15, 3]  # asked per call
    assert zero_gpu.calls[-1]["end"] == "exhausted" and zero_gpu.calls[-1]["sent"] == 3


def test_on_zero_gpu_results_leave_on_the_cpu(zero_gpu, monkeypatch):
    # the worker (forked after this patch) marks what it moved; the marks cross back
    monkeypatch.setattr(gpu, "to_cpu", lambda v: ("moved", v))
    assert gpu.gpu_task()(square)(2) == ("moved", 4)
    assert list(gpu.gpu_task()(count)(2)) == [("moved", 0), ("moved", 1)]


def yields_a_lock():
    yield threading.Lock()


def test_the_stand_in_refuses_what_cannot_cross_the_process_boundary(zero_gpu):
    with pytest.raises(TypeError, match="pickle"):
        list(gpu.gpu_task()(count)(threading.Event()))  # an Event as an argument
    with pytest.raises(gr.Error, match="PicklingError"):
        list(gpu.gpu_task()(yields_a_lock)())  # a lock as an item: spaces' generic error
    with pytest.raises(pickle.PicklingError, match="meta tensor"):
        _dumps({"maps": torch.empty(2, device="meta")})  # as a CUDA tensor would be
    with pytest.raises(AssertionError, match="CUDA started"):
        torch.zeros(1, device="cuda")  # the app may not start CUDA (its is_available says yes)


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
    got = gpu.analyse_on_device(first_block_sum, model, x)
    assert zero_gpu.calls == [{"seconds": gpu.ANALYSIS_SECONDS, "sent": 0, "end": None}]
    assert gpu.ANALYSIS_SECONDS < 60
    assert torch.equal(got["out"], model(x)) and got["out"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_in_a_zero_gpu_worker_the_analysis_runs_on_cuda_and_leaves_the_model_on_the_cpu(
        zero_gpu):
    model, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    got = gpu.analyse_on_device(first_block_sum, model, x)
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
    """The tokens, attention and distance tabs' forward passes, and the Lecture's, each go
    through `analyse_on_device` (a spaces.GPU call on ZeroGPU), on the real offline model."""
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
    # the Lecture's steps: tokens (steps 1, 3, 4), attention (5), distance (6)
    from explorer.ui import lecture_view
    called.clear()
    lecture_view._PREPARED.clear()
    example = images.example_paths()[0].stem
    for figure in ("sequence", "rollout", "distance"):
        lecture_view.FIGURES[figure](example, 224, False)
    assert called == ["analyse_tokenization", "capture", "model_mean_attention_distance"]


# -- training on the GPU: the streamed call --------------------------------------------------

needs_fashion_mnist = pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.is_dir(),
                                         reason="needs Debian's dataset-fashion-mnist")


@pytest.fixture
def one_thread():
    """The same thread count here and in the forked worker (which takes one): same numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit() -> torch.nn.Module:
    """timm's registered test ViT (dim 64, 6 blocks, patch 16) at 32 px: 2x2 patches."""
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, dynamic_img_size=True, img_size=32)


@pytest.fixture(scope="module")
def data():
    full = datasets.fashion_mnist("train", 120, seed=0)
    return datasets.train_val_split(full, 0.25, seed=0)  # 90 to train, 30 to validate


def echo(n, cancel=None, scale=1):
    yield n * scale, cancel


def test_off_zero_gpu_a_stream_is_the_plain_generator_call(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setitem(sys.modules, "spaces", None)
    cancel = threading.Event()
    stream = gpu.stream_on_device(echo, 2, cancel=cancel, seconds=10, scale=3,
                                  on_cancel=lambda events: pytest.fail("not off ZeroGPU"))
    assert stream.gi_code is echo.__code__  # the generator itself, no wrapper
    assert next(stream) == (6, cancel)  # the caller's own cancel event, passed through


def test_on_zero_gpu_a_stream_runs_in_the_worker_without_the_callers_event(zero_gpu):
    cancel = threading.Event()  # an Event cannot cross: the worker's run gets none
    assert list(gpu.stream_on_device(echo, 2, cancel=cancel, seconds=10, scale=3)) == [(6, None)]
    assert zero_gpu.calls == [{"seconds": 10, "sent": 1, "end": "exhausted"}]


@needs_fashion_mnist
def test_on_zero_gpu_a_fine_tune_streams_from_the_worker_and_ends_with_a_cpu_model(
        zero_gpu, data, one_thread, monkeypatch):
    from explorer.finetune import FinetuneConfig, run_finetune

    train, val = data
    config = FinetuneConfig(mode="full", epochs=2, batch_size=16, augment=False)
    model = tiny_vit()
    handed = copy.deepcopy(model.state_dict())
    events = list(gpu.stream_on_device(run_finetune, model, train, val, config,
                                       cancel=threading.Event(), seconds=42))
    # 90 images / 16 per step: 6 steps an epoch, 2 epochs, an evaluation after each
    assert [e.done for e in events if e.stage == "train"] == list(range(1, 13))
    assert [e.done for e in events if e.stage == "eval"] == [6, 12]
    assert events[-1].stage == "done" and zero_gpu.calls[-1]["seconds"] == 42
    assert zero_gpu.calls[-1]["end"] == "exhausted" and zero_gpu.calls[-1]["sent"] == 15
    result = events[-1].result
    assert all(p.device.type == "cpu" for p in result.model.parameters())
    assert "_original_forward" not in vars(result.model)
    # trained in the worker: the app's model is as it was handed over
    assert all(torch.equal(v, handed[k]) for k, v in model.state_dict().items())
    # ... and the worker's run is the plain run, step for step
    with monkeypatch.context() as off:  # here, as off ZeroGPU
        off.delenv("SPACES_ZERO_GPU")
        off.setattr(torch.cuda, "is_available", zero_gpu.real_cuda[0])
        off.setattr(torch.cuda, "_lazy_init", zero_gpu.real_cuda[1])
        plain = list(run_finetune(tiny_vit(), train, val, config))[-1].result
    losses = [[h.get("loss", h.get("val_loss")) for h in r.history] for r in (result, plain)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, got), want in zip(result.model.state_dict().items(),
                                 plain.model.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, msg=name)
    assert (result.val_preds == plain.val_preds).all() and result.val_acc == plain.val_acc
    assert not torch.cuda.is_initialized()


@needs_fashion_mnist
def test_on_zero_gpu_a_cancelled_fine_tune_closes_the_worker_and_says_cancelled(
        zero_gpu, data):
    from explorer.finetune import FinetuneConfig, run_finetune
    from explorer.finetune.engine import cancelled_event

    train, val = data
    config = FinetuneConfig(mode="full", epochs=200, batch_size=8)  # 12 steps an epoch: 2,400
    model, cancel, events = tiny_vit(), threading.Event(), []
    for event in gpu.stream_on_device(run_finetune, model, train, val, config, cancel=cancel,
                                      seconds=60,
                                      on_cancel=functools.partial(cancelled_event, model,
                                                                  train, config)):
        events.append(event)
        if event.stage == "train" and event.done == 2:
            cancel.set()
    # as off ZeroGPU (tests/test_finetune.py): two steps, no evaluation, "cancelled" last
    assert [e.done for e in events if e.stage == "train"] == [1, 2]
    assert not any(e.stage == "eval" for e in events)
    last = events[-1]
    assert last.stage == "cancelled" and last.result.cancelled and len(events) == 3
    assert last.result.history == [events[0].metrics, events[1].metrics]
    assert last.result.classes == train.classes and last.result.resolution == (32, 32)
    # the worker's generator was closed at a yield, cleanly, long before its 2,400 steps
    record = zero_gpu.calls[-1]
    assert record["end"] == "closed" and 2 <= record["sent"] < 2400
    assert not torch.cuda.is_initialized()


def test_a_training_calls_duration_follows_the_sizing_rule():
    # 15 s to start + 2 x (100 steps x 0.02 s + 1,000 images x 224² px x 25 ns + 1 PFLOP at
    # 50 TFLOP/s) = 15 + 2 x (2 + 1.2544 + 20) = 61.5088: 62 s
    assert gpu.training_seconds(100, 1000, 224 * 224, 1e15) == 62
    assert gpu.training_seconds(0) == 15
    assert gpu.training_seconds(10**6) == gpu.MAX_CALL_S == 300  # ZeroGPU's most per call
    # the lab's live run: 600 steps, launch-bound: 15 + 2 x 12 = 39 s
    from explorer.lab.engine import LIVE_BUDGET
    assert gpu.training_seconds(LIVE_BUDGET.steps(500)) == 39


def test_a_fine_tunes_duration_counts_its_planned_work(monkeypatch):
    from explorer.finetune import FinetuneConfig
    from explorer.finetune.engine import finetune_seconds

    asked = []
    monkeypatch.setattr(gpu, "training_seconds", lambda *work: asked.append(work) or 0)
    model = tiny_vit()
    params = sum(p.numel() for p in model.parameters())
    forward = 2 * params * (2 * 2 + 1)  # 2x2 patches + the class token at 32 px
    full = FinetuneConfig(mode="full", epochs=2, batch_size=16, resolution=32)
    finetune_seconds(model, 90, 30, full)
    # 6 steps an epoch; 2 x 90 images trained (3 passes) and 2 x 30 evaluated (1 pass)
    assert asked[-1] == (12, 240, 32 * 32, (3 * 180 + 60) * forward)
    finetune_seconds(model, 90, 30, FinetuneConfig(mode="full", epochs=2, batch_size=16,
                                                   resolution=32, max_steps=4))
    assert asked[-1] == (4, 64 + 30, 1024, (3 * 64 + 30) * forward)  # one epoch begun
    finetune_seconds(model, 90, 30, FinetuneConfig(mode="last_k", epochs=1, batch_size=8,
                                                   grad_accum=2, resolution=64))
    forward_64 = 2 * params * (4 * 4 + 1)
    assert asked[-1] == (6, 120, 64 * 64, (3 * 90 + 30) * forward_64)  # 16 images a step
    finetune_seconds(model, 90, 30, FinetuneConfig(mode="linear", epochs=3, batch_size=32,
                                                   resolution=32))
    # the features of all 120 images once (1 pass), then 3 x 3 steps of the linear head
    assert asked[-1] == (9, 120, 1024, 120 * forward)


def test_training_uses_cuda_only_where_the_process_may_start_it(monkeypatch):
    """accelerate is forced to the CPU in a ZeroGPU Space's own process only; inside a GPU
    call (the worker) and everywhere else it places the run itself, as before."""
    from explorer import training

    asked = []
    monkeypatch.setattr(training, "Accelerator", lambda **kw: asked.append(kw["cpu"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as spaces patches it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    training.make_accelerator()
    assert asked == [False] and training.resolve_mixed_precision("auto") == "bf16"
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    training.make_accelerator()
    assert asked[-1] is True and training.resolve_mixed_precision("auto") == "no"
    with gpu._inside_gpu_call():  # what `gpu_task` does in the worker
        training.make_accelerator()
        assert asked[-1] is False and training.resolve_mixed_precision("auto") == "bf16"
    assert not gpu.in_gpu_call()


def test_a_model_trained_under_mixed_precision_crosses_as_a_plain_cpu_module():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # accelerate's state is process-wide
    try:
        model = Accelerator(cpu=True, mixed_precision="bf16").prepare(torch.nn.Linear(64, 8))
    finally:
        AcceleratorState._reset_state(True)
    x = torch.randn(4, 64)
    exact = torch.nn.functional.linear(x, model.weight, model.bias)
    assert not torch.equal(model(x), exact)  # its forward runs under bf16 autocast
    plain = gpu.to_cpu({"model": model})["model"]
    assert torch.equal(plain(x), exact) and "_original_forward" not in vars(plain)
    pickle.loads(_dumps(plain))


@needs_fashion_mnist
def test_on_zero_gpu_the_fine_tune_tab_trains_in_the_worker_and_cancels(zero_gpu, tmp_path,
                                                                        monkeypatch):
    """The tab's Train on the real offline model: the run goes to the worker with the
    duration the sizing rule gives, and Cancel ends it with the tab's "Cancelled" outcome."""
    from explorer import session_context
    from explorer.finetune.engine import finetune_seconds
    from explorer.models import DEFAULT_MODEL
    from explorer.ui import finetune_tab as tab

    monkeypatch.setattr(session_context, "finetuned_dir", lambda: tmp_path)
    settings = ("Full fine-tune", 1, 28, 50, 0, 8)  # 40 images: 5 steps an epoch, 250 steps

    def cancel_at_first_progress(*args, **kwargs):
        tab.cancel_job(None)

    outputs = list(tab.train(tab.BUILTIN, None, 50, DEFAULT_MODEL, *settings,
                             progress=cancel_at_first_progress))
    assert outputs[-1]["status"].startswith("**Cancelled.**") and outputs[-1]["checkpoint"] is None
    record = zero_gpu.calls[-1]
    assert record["end"] == "closed" and record["sent"] < 250
    model = tab.fresh_model(DEFAULT_MODEL, 28)
    assert record["seconds"] == finetune_seconds(model, 40, 10, tab.training_config(*settings))
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing saved
    assert not torch.cuda.is_initialized()


@needs_fashion_mnist
def test_on_zero_gpu_the_labs_live_run_trains_in_the_worker_and_stops(zero_gpu):
    from explorer.lab.engine import Budget
    from explorer.session_context import context
    from explorer.ui import lab_tab

    budget = Budget(min_steps=12, epochs=0, evals=2)  # events at steps 6 and 12, then the end
    session = context("zero-gpu-lab")
    outputs = list(lab_tab.live_run("cnn", 500, 0, session, budget))
    assert "test accuracy" in outputs[-1]["status"] and "data_plot" in outputs[-1]
    # 12 launch-bound steps: 15 + 2 x 0.24 = 15.48, rounded up
    assert zero_gpu.calls[-1] == {"seconds": 16, "sent": 3, "end": "exhausted"}
    outputs = []
    for out in lab_tab.live_run("cnn", 500, 0, session, budget):
        outputs.append(out)
        session.stop(lab_tab.JOB)
    assert outputs[-1]["status"] == "Stopped." and "data_plot" not in outputs[-1]
    assert zero_gpu.calls[-1]["end"] in ("closed", "exhausted")  # 12 steps may end first
    assert not torch.cuda.is_initialized()


def device_of_training(cancel=None):
    from explorer.training import make_accelerator

    yield str(make_accelerator().device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_in_a_zero_gpu_worker_training_runs_on_cuda(zero_gpu):
    where = list(gpu.stream_on_device(device_of_training, cancel=threading.Event(), seconds=20))
    assert where[0].startswith("cuda")


# -- errors from the worker ------------------------------------------------------------------


def fails(err):
    raise err


def fails_streaming(err, cancel=None):
    yield "started"
    raise err


class TwoPartError(Exception):
    """An exception pickle cannot rebuild (its __init__ takes other arguments than ``args``)."""

    def __init__(self, what, why):
        super().__init__(f"{what}: {why}")


def fails_oddly():
    raise TwoPartError("layer 3", "no weights")


def test_the_stand_in_replaces_worker_errors_as_spaces_does(zero_gpu):
    """Straight through the stand-in (no `gpu_task`): a `gr.Error` comes back as it is, any
    other exception as spaces' generic error naming its class only."""
    handler, streamed = zero_gpu.GPU(duration=5)(fails), zero_gpu.GPU(duration=5)(fails_streaming)
    for call in (lambda err: handler(err), lambda err: list(streamed(err))):
        with pytest.raises(gr.Error) as caught:
            call(ValueError("a message for people"))
        assert caught.value.message == "ValueError"
        assert caught.value.title == "ZeroGPU worker error"
        with pytest.raises(gr.Error) as caught:
            call(gr.Error("said as it is"))
        assert caught.value.message == "said as it is"
    # ... as the installed spaces does (spaces/zero/wrappers.py)
    installed = importlib.machinery.PathFinder.find_spec("spaces")  # not the stand-in
    source = (pathlib.Path(installed.origin).parent / "zero" / "wrappers.py").read_text()
    assert "if isinstance(exc, gr.Error):\n        gradio_error = exc" in source
    assert source.count('raise error("ZeroGPU worker error", res.error_cls)') == 2


def user_errors() -> list[Exception]:
    """One of each error the tabs show as a message (`explorer.ui.common.user_errors`)."""
    from explorer import images
    from explorer.errors import ModelUnavailableError
    from explorer.session_context import ModelSaveError

    return [images.ImageError("Could not read /srv/uploads/cat.png: truncated file."),
            datasets.DatasetError("The zip has only one class folder (cats/)."),
            ModelUnavailableError("'hf-hub:someone/vit' is not cached and the hub cannot be "
                                  "reached."),
            ModelSaveError("The disk quota for saved models is full."),
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")]


@pytest.mark.parametrize("index", range(5), ids=lambda i: type(user_errors()[i]).__name__)
def test_on_zero_gpu_an_error_for_people_reaches_the_app_as_itself(zero_gpu, index):
    from explorer.ui import common

    def shown(run) -> str:  # what a tab says for it (`common.user_errors`)
        with pytest.raises(gr.Error) as caught, common.user_errors():
            run()
        return caught.value.message

    err = user_errors()[index]
    off_zero_gpu = shown(lambda: fails(err))
    call, stream = gpu.gpu_task()(fails), gpu.gpu_task()(fails_streaming)
    for run in (lambda: call(err),
                lambda: list(stream(err)),
                lambda: list(gpu.stream_on_device(fails_streaming, err,
                                                  cancel=threading.Event(), seconds=5))):
        with pytest.raises(type(err)) as caught:
            run()
        assert str(caught.value) == str(err) and type(caught.value) is type(err)
        assert shown(run) == off_zero_gpu
    assert not torch.cuda.is_initialized()


def test_on_zero_gpu_a_bug_in_the_worker_stays_that_bug_with_the_workers_traceback(zero_gpu):
    with pytest.raises(KeyError) as caught:
        gpu.gpu_task()(fails)(KeyError("blocks.12"))
    note = "".join(caught.value.__notes__)
    assert note.startswith("Raised in the ZeroGPU worker") and "in fails" in note
    # one that pickle cannot rebuild keeps its class name and message
    with pytest.raises(RuntimeError) as caught:
        gpu.gpu_task()(fails_oddly)()
    assert str(caught.value) == "TwoPartError: layer 3: no weights"
    assert "in fails_oddly" in "".join(caught.value.__notes__)


@needs_fashion_mnist
def test_on_zero_gpu_the_fine_tune_tab_says_what_the_worker_raised(zero_gpu, tmp_path,
                                                                    monkeypatch):
    """The tab's message for an error raised in the worker is the one it gives off ZeroGPU."""
    from explorer import session_context
    from explorer.models import DEFAULT_MODEL
    from explorer.ui import finetune_tab as tab

    monkeypatch.setattr(session_context, "finetuned_dir", lambda: tmp_path)
    monkeypatch.setattr(tab, "run_finetune", cannot_read_an_image)

    def message() -> str:
        with pytest.raises(gr.Error) as caught:
            list(tab.train(tab.BUILTIN, None, 50, DEFAULT_MODEL, "Full fine-tune", 1, 28, 1, 0,
                           8, progress=lambda *a, **k: None))
        return caught.value.message

    on_zero_gpu = message()
    # raised in the worker, which sent it back as its stream's last item (`gpu._Raised`)
    assert zero_gpu.calls[-1]["end"] == "exhausted"
    with monkeypatch.context() as off:
        off.delenv("SPACES_ZERO_GPU")
        assert message() == on_zero_gpu == "Could not read 3.png: truncated file."
    assert not torch.cuda.is_initialized()


def cannot_read_an_image(model, train_set, val_set, config, cancel=None, model_key=None):
    from explorer import images

    yield from ()
    raise images.ImageError("Could not read /srv/data/shirts/3.png: truncated file.")


# -- a run too long for one ZeroGPU call -----------------------------------------------------


def test_a_run_longer_than_one_call_is_refused_with_the_most_epochs_that_fit():
    from explorer.finetune import FinetuneConfig
    from explorer.finetune.engine import too_long_for_one_call

    model = tiny_vit()  # 365,096 parameters: a forward pass at 32 px (2x2 patches + class
    assert sum(p.numel() for p in model.parameters()) == 365_096  # token) is 3,650,960 FLOPs
    # Full, batch 1, 1,000 images to train (no validation, for round numbers): an epoch is
    # 1,000 steps x 0.02 s + 1,000 x 1,024 px x 25 ns + 3 x 1,000 x 3,650,960 / 50e12 s
    # = 20 + 0.0256 + 0.000219 = 20.025819 s, doubled: 40.051638 s; plus 15 s to start,
    # 7 epochs: 295.36 -> 296 s (fit); 8 epochs: 335.41 -> 336 s (do not). A linear probe
    # at batch 1 takes as many steps (8,000: 335.05 -> 336 s): it is not suggested.
    full = FinetuneConfig(mode="full", epochs=8, batch_size=1, resolution=32)
    assert too_long_for_one_call(model, 1000, 0, full) == (
        "This run needs about 336 s of GPU, and one ZeroGPU call allows 300 s. Lower the "
        "epochs (at most 7 fit), the number of images or the resolution.")
    assert too_long_for_one_call(model, 1000, 0, replace(full, epochs=7)) is None
    assert too_long_for_one_call(model, 1000, 0, full, limit=400) is None  # 336 s: fits 400
    # Full at 512 px (32x32 patches + the class token: 748,446,800 FLOPs a forward pass),
    # batch 32: an epoch is 32 steps (0.64 s) + 1,000 x 262,144 px x 25 ns (6.5536 s) +
    # 3,000 forward passes (0.0449068 s) = 7.2385068 s, doubled 14.4770136 s: 19 epochs
    # 290.06 -> 291 s, 20 epochs 304.54 -> 305 s. A linear probe of 20 epochs: 640 steps
    # (12.8 s) + 1,000 images once (6.5536 s) + 1,000 forward passes (0.015 s), doubled,
    # plus 15: 53.7 -> 54 s, which fits: it is suggested.
    high = FinetuneConfig(mode="full", epochs=20, batch_size=32, resolution=512)
    assert too_long_for_one_call(model, 1000, 0, high) == (
        "This run needs about 305 s of GPU, and one ZeroGPU call allows 300 s. Lower the "
        "epochs (at most 19 fit), the number of images or the resolution, or train a linear "
        "probe (its features are computed once).")
    # A linear probe of 1,000,000 images: 31,250 steps an epoch (625 s) alone is too long;
    # 3 epochs: 93,750 x 0.02 + 10^6 x 1,024 x 25 ns + 10^6 x 3,650,960 / 50e12
    # = 1,875 + 25.6 + 0.073 s, doubled, plus 15: 3,816.35 -> 3,817 s
    linear = FinetuneConfig(mode="linear", epochs=3, batch_size=32, resolution=32)
    assert too_long_for_one_call(model, 10**6, 0, linear) == (
        "This run needs about 3817 s of GPU, and one ZeroGPU call allows 300 s: even one "
        "epoch is too long. Lower the number of images or the resolution.")


LONG_RUN = ("Full fine-tune", 1, 112, 100, 0, 1)  # 80 images at batch 1: 8,000 steps


@needs_fashion_mnist
def test_on_zero_gpu_the_fine_tune_tab_refuses_a_run_too_long_for_one_call(zero_gpu,
                                                                          tmp_path,
                                                                          monkeypatch):
    from explorer import session_context
    from explorer.finetune.engine import too_long_for_one_call
    from explorer.models import DEFAULT_MODEL
    from explorer.ui import finetune_tab as tab

    monkeypatch.setattr(session_context, "finetuned_dir", lambda: tmp_path)
    with pytest.raises(gr.Error) as caught:
        list(tab.train(tab.BUILTIN, None, 100, DEFAULT_MODEL, *LONG_RUN,
                       progress=lambda *a, **k: None))
    model, config = tab.fresh_model(DEFAULT_MODEL, 112), tab.training_config(*LONG_RUN)
    assert caught.value.message == too_long_for_one_call(model, 80, 20, config)
    assert "one ZeroGPU call allows 300 s" in caught.value.message
    assert "Lower the epochs (at most " in caught.value.message
    assert "/" not in caught.value.message and not caught.value.print_exception
    assert zero_gpu.calls == []  # refused before any GPU call
    assert not list(tmp_path.rglob("*.safetensors")) and not torch.cuda.is_initialized()


@needs_fashion_mnist
def test_off_zero_gpu_the_fine_tune_tab_starts_a_long_run(monkeypatch):
    from explorer.models import DEFAULT_MODEL
    from explorer.ui import finetune_tab as tab

    class Started(Exception):
        pass

    def started(*args, **kwargs):
        raise Started

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setattr(gpu, "stream_on_device", started)
    with pytest.raises(Started):
        list(tab.train(tab.BUILTIN, None, 100, DEFAULT_MODEL, *LONG_RUN,
                       progress=lambda *a, **k: None))


# -- the layer-wise probe on the GPU ---------------------------------------------------------


def test_work_runs_on_cuda_wherever_this_process_may_start_it(monkeypatch):
    from explorer import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as spaces patches it
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert models.default_device().type == "cuda"  # dedicated GPU
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert models.default_device().type == "cpu"  # the app's process
    with gpu._inside_gpu_call():  # a ZeroGPU worker
        assert models.default_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("SPACES_ZERO_GPU")
    assert models.default_device().type == "cpu"


def test_a_layerwise_probes_duration_counts_its_forward_passes_and_its_probes():
    from explorer.finetune.probe import PROBE_STEP_S, fit_seconds, layerwise_seconds

    assert PROBE_STEP_S == 0.002 and fit_seconds(6, 300) == pytest.approx(3.6)
    # 2 + 1 batches of 64 (0.06 s); 120 images of 1,024 px (0.003072 s), a forward pass
    # each: 120 x 2 x 365,096 parameters x (4 patches + the class token) / 50e12 (0.0000088
    # s); 6 probes of 300 steps (3.6 s): 15 + 2 x 3.6630808 = 22.33 -> 23 s
    assert layerwise_seconds(tiny_vit(), 90, 30, (32, 32), 64) == 23
    assert layerwise_seconds(tiny_vit(), 90, 30, (32, 32), 64, steps=50) == 17  # 15 + 2 x 0.66


def test_on_zero_gpu_an_optimiser_step_in_the_app_would_start_cuda(zero_gpu):
    """Why the probes are fitted in the worker: AdamW's step asks for the current CUDA stream
    where `torch.cuda.is_available()` says True, as spaces makes it say in the app."""
    from explorer.finetune.probe import ProbeRecipe, fit_linear_classifier

    x, y = torch.randn(8, 3), torch.arange(8) % 2
    with pytest.raises(AssertionError, match="CUDA started"):
        fit_linear_classifier(x, y, 2, ProbeRecipe(steps=1))


def test_on_zero_gpu_the_probes_of_any_model_are_fitted_in_the_worker(zero_gpu):
    """`layerwise_probe` (the iGPT's): features here, the probes in one GPU call."""
    from explorer.finetune.probe import fit_seconds, layerwise_probe

    def features_fn(labels):  # layer 1 constant, layer 2 the one-hot label
        return torch.stack([torch.zeros(len(labels), 3), F.one_hot(labels, 3).float()], 1)

    y = torch.tensor([0, 1, 2] * 4)

    def run():
        return list(layerwise_probe(features_fn, [(y, y)], [(y[:6], y[:6])], 3, "hand-made",
                                    threading.Event(), steps=50))

    events = run()
    assert [e[:2] for e in events] == [("features", 1), ("features", 2), ("probe", 1),
                                       ("probe", 2), ("done", 2)]
    # 2 probes of 50 steps: 15 + 2 x 0.2 = 15.4 -> 16 s
    assert gpu.training_seconds(0, seconds=fit_seconds(2, 50)) == 16
    assert zero_gpu.calls == [{"seconds": 16, "sent": 3, "end": "exhausted"}]
    with pytest.MonkeyPatch.context() as off:
        off.delenv("SPACES_ZERO_GPU")
        off.setattr(torch.cuda, "is_available", zero_gpu.real_cuda[0])
        off.setattr(torch.cuda, "_lazy_init", zero_gpu.real_cuda[1])
        assert run() == events
    assert events[-1][2].val_acc == [pytest.approx(1 / 3), 1.0]
    assert not torch.cuda.is_initialized()


@needs_fashion_mnist
def test_on_zero_gpu_the_layerwise_probe_runs_in_one_worker_call(zero_gpu, data, one_thread,
                                                                 monkeypatch):
    from explorer.finetune.probe import layerwise_seconds, vit_layerwise_probe

    train, val = data
    model = tiny_vit()
    events = list(vit_layerwise_probe(model, train, val, (32, 32), 64, "tiny",
                                      threading.Event(), steps=50))
    # 2 + 1 feature batches, then a probe for each of the 6 blocks
    assert [e[:2] for e in events] == [*(("features", i) for i in (1, 2, 3)),
                                       *(("probe", i) for i in range(1, 7)), ("done", 6)]
    seconds = layerwise_seconds(model, 90, 30, (32, 32), 64, steps=50)
    assert zero_gpu.calls == [{"seconds": seconds, "sent": 10, "end": "exhausted"}]
    with monkeypatch.context() as off:  # here, as off ZeroGPU
        off.delenv("SPACES_ZERO_GPU")
        off.setattr(torch.cuda, "is_available", zero_gpu.real_cuda[0])
        off.setattr(torch.cuda, "_lazy_init", zero_gpu.real_cuda[1])
        plain = list(vit_layerwise_probe(tiny_vit(), train, val, (32, 32), 64, "tiny",
                                         steps=50))
    assert [e[:2] for e in plain] == [e[:2] for e in events]
    assert events[-1][2] == plain[-1][2]  # the same accuracies, block for block
    assert not torch.cuda.is_initialized()


@needs_fashion_mnist
def test_on_zero_gpu_a_cancelled_layerwise_probe_closes_the_worker(zero_gpu, data):
    from explorer.finetune.probe import vit_layerwise_probe

    train, val = data
    cancel, events = threading.Event(), []
    for event in vit_layerwise_probe(tiny_vit(), train, val, (32, 32), 1, "tiny", cancel):
        events.append(event)
        cancel.set()
    assert events == [("features", 1, None)]  # no probe fitted, no result
    assert zero_gpu.calls[-1]["end"] in ("closed", "exhausted")  # 120 batches may end first
    assert zero_gpu.calls[-1]["sent"] >= 2
    assert not torch.cuda.is_initialized()


@needs_fashion_mnist
def test_on_zero_gpu_the_fine_tune_tabs_layerwise_probe_borrows_the_gpu(zero_gpu):
    """The tab's "Probe every layer" on the real offline model: its features in a GPU call
    sized by `layerwise_seconds`, and Cancel ends it with the tab's "Cancelled"."""
    from explorer.finetune.probe import layerwise_seconds
    from explorer.finetune.resolution import snap_resolution
    from explorer.models import DEFAULT_MODEL
    from explorer.ui import finetune_tab as tab

    def cancel_at_first_progress(*args, **kwargs):
        tab.cancel_job(None)

    status, figure = tab.layerwise(tab.BUILTIN, None, 50, DEFAULT_MODEL, 56, None,
                                   progress=cancel_at_first_progress)
    assert status == "**Cancelled.**" and figure is None
    model = tab.fresh_model(DEFAULT_MODEL, 56)
    size = snap_resolution(model, 56)
    assert zero_gpu.calls[0]["seconds"] == layerwise_seconds(model, 40, 10, size, 64)
    assert zero_gpu.calls[0]["end"] in ("closed", "exhausted")  # 2 batches may end first
    assert not torch.cuda.is_initialized()


def probe_devices(monkeypatch) -> list:
    """Record where `layer_features` sees the model and the pixels."""
    from explorer.finetune import probe

    seen, real = [], probe.layer_features

    def recorded(model, pixels):
        seen.append((next(model.parameters()).device.type, pixels.device.type))
        return real(model, pixels)

    monkeypatch.setattr(probe, "layer_features", recorded)
    return seen


@needs_fashion_mnist
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_dedicated_gpu_the_layerwise_probe_runs_on_cuda(data, monkeypatch):
    from explorer.finetune.probe import vit_layerwise_probe

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    seen = probe_devices(monkeypatch)
    train, val = data
    model = tiny_vit()
    *_, (_, _, probe) = vit_layerwise_probe(model, train, val, (32, 32), 64, "tiny", steps=5)
    assert seen == [("cuda", "cuda")] * 3 and probe.depths == [1, 2, 3, 4, 5, 6]
    assert next(model.parameters()).device.type == "cpu"  # left where it came from


@needs_fashion_mnist
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_in_a_zero_gpu_worker_the_layerwise_probe_runs_on_cuda(zero_gpu, data):
    from explorer.finetune.probe import vit_layer_features

    train, val = data
    events = list(gpu.stream_on_device(vit_layer_features, tiny_vit(), train, val, (32, 32),
                                       cancel=threading.Event(), seconds=20))
    features = events[-1][2]
    assert events[-1][0] == "extracted" and features.train_x.device.type == "cpu"
    assert features.train_x.shape == (90, 6, 128)
