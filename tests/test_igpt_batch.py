"""One decode loop for everyone (`explorer.igpt.batch`): requests join and leave a running
batch, and each one's samples are those it would get alone and from `complete_stream`."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from explorer.igpt import batch
from explorer.igpt.model import IGPTConfig, ImageGPT
from explorer.igpt.sampler import SampleConfig, complete
from explorer.igpt.sequence import with_start
from tests.igpt_helpers import tiny_hf
from tests.kernel_helpers import needs_compiler
from tests.test_igpt_sampler import generate


def wide_model() -> ImageGPT:
    """Heads of 32 (the offline model's): the kernel's vector paths, not its scalar tail."""
    torch.manual_seed(5)
    m = ImageGPT(IGPTConfig(vocab_size=17, n_positions=36, n_embd=64, n_layer=2, n_head=2))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.eval()


def steps() -> dict[str, object]:
    """The step implementations to test: PyTorch always, the kernel where it builds."""
    out = {"torch": lambda m: batch.TorchStep()}
    out["kernel"] = lambda m: batch.KernelStep(m, kernels_op())
    return out


def kernels_op():
    from explorer import kernels

    op = kernels.decode_op()
    if op is None:
        pytest.skip(f"no compiled kernel: {kernels.build_error()}")
    return op


STEPS = [pytest.param("torch"), pytest.param("kernel", marks=needs_compiler)]
MODELS = {"tiny": lambda: ImageGPT.from_hf(tiny_hf(seed=4, std=0.05)), "wide": wide_model}


def image(seed: int, n: int = 36) -> torch.Tensor:
    return torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(seed))


def alone(model, make_step, prefix, n, cfg) -> torch.Tensor:
    """The request run by itself in a fresh loop."""
    loop = batch.DecodeLoop(model, make_step(model), lanes=1)
    return list(loop.submit(model, prefix, n, 36, cfg))[-1][1]


class Gate:
    """Wraps a step: records each step's groups and holds chosen steps until released, so a
    test can submit requests while others are mid-flight."""

    def __init__(self, inner, hold_at: set[int]):
        self.inner, self.hold_at, self.calls, self.groups = inner, hold_at, 0, []
        self.reached, self.release = threading.Event(), threading.Event()

    def new_cache(self, *args):
        return self.inner.new_cache(*args)

    def __call__(self, tokens, group):
        self.calls += 1
        self.groups.append([c.n for c in group])
        if self.calls in self.hold_at:
            self.reached.set()
            assert self.release.wait(30)
            self.release.clear()
        return self.inner(tokens, group)

    def wait(self) -> None:
        assert self.reached.wait(30)
        self.reached.clear()


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_requests_joining_mid_flight_get_their_own_samples(step, model_name):
    """Three requests (different images, prefix lengths, sample counts, settings and seeds)
    join one running batch at different steps; each gets exactly what it gets alone, which is
    what `complete` (the reference sampler) gives for the same seed."""
    model, make_step = MODELS[model_name](), steps()[step]
    requests = [  # (prefix, n, settings)
        (image(1)[:12], 3, SampleConfig(seed=1)),
        (image(2)[:20], 2, SampleConfig(seed=2, top_k=4, temperature=0.8)),
        (image(3)[:6], 1, SampleConfig(seed=3, top_p=0.9)),
        (image(4)[:14], 2, SampleConfig(greedy=True)),
    ]
    gate = Gate(make_step(model), hold_at={3, 6, 8})
    loop = batch.DecodeLoop(model, gate, lanes=1)
    results: dict[int, list] = {}

    def consume(i, completion):
        results[i] = list(completion)

    threads = []
    for i, (prefix, n, cfg) in enumerate(requests):
        if i:
            gate.wait()  # the batch is mid-flight: join now
        c = loop.submit(model, prefix, n, 36, cfg)
        threads.append(threading.Thread(target=consume, args=(i, c)))
        threads[-1].start()
        if i:
            gate.release.set()
    for t in threads:
        t.join(60)
    sizes = [sum(g) for g in gate.groups]
    assert max(len(g) for g in gate.groups) == 4  # all four ran together at some step
    assert sizes[0] == 3 and max(sizes) == 8 and sizes[-1] < 8  # rows joined, then left
    for i, (prefix, n, cfg) in enumerate(requests):
        got = results[i][-1][1]
        assert results[i][-1][0] == 36 and got.shape == (n, 36)
        assert torch.equal(got[:, :len(prefix)], prefix.expand(n, -1))
        assert torch.equal(got, alone(model, make_step, prefix, n, cfg)), f"request {i}"
        assert torch.equal(got, complete(model, prefix.expand(n, -1).contiguous(), 36, cfg))


@needs_compiler
@pytest.mark.parametrize("model_name", list(MODELS))
def test_kernel_logits_do_not_depend_on_the_batch(model_name):
    """A group's logits are bit for bit the same alone, beside other groups at other
    positions, and in any row of a padded tile (B = 1 .. 7)."""
    model = MODELS[model_name]()
    step = batch.KernelStep(model, kernels_op())

    def group(seed, n, P, t):
        c = batch.Completion(model, image(seed)[:P], n, 36, SampleConfig())
        c.cache = step.new_cache(model, batch.prefill(model, image(seed)[:P])[0], n, 36)
        c.out[:, :t] = image(seed + 10)[:t]
        c.t = t
        return c

    with torch.inference_mode():
        def logits(groups):
            tokens = torch.cat([c.out[:, c.t - 1] for c in groups])
            return step(tokens, groups)

        a = group(1, 3, 12, 20)
        base = logits([a]).clone()
        for others in ([group(2, 1, 5, 9)], [group(3, 2, 20, 30), group(4, 1, 0, 3)],
                       [group(5, 4, 30, 31)]):
            a.cache = step.new_cache(model, batch.prefill(model, image(1)[:12])[0], 3, 36)
            assert torch.equal(logits(others + [a])[-3:], base)


@needs_compiler
@pytest.mark.parametrize("model_name", list(MODELS))
def test_kernel_step_matches_the_model_without_a_cache(model_name):
    """Independent reference: the model's full causal forward over the same sequence."""
    model = MODELS[model_name]()
    step = batch.KernelStep(model, kernels_op())
    seqs = torch.stack([image(7), image(8)])
    P = 10
    c = batch.Completion(model, seqs[0, :P], 2, 36, SampleConfig())
    c.cache = step.new_cache(model, batch.prefill(model, seqs[0, :P])[0], 2, 36)
    seqs[1, :P] = seqs[0, :P]  # one image's prefix, two samples after it
    with torch.inference_mode():
        full = model(with_start(seqs[:, :35], model.config.start_token))  # (2, 36, V)
        for t in range(P + 1, 36):  # pixel t - 1 goes in at position t
            c.t = t
            got = step(seqs[:, t - 1], [c])
            torch.testing.assert_close(got, full[:, t], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("step", STEPS)
def test_greedy_in_the_loop_equals_transformers_generate(step):
    hf = tiny_hf(seed=1)
    model = ImageGPT.from_hf(hf)
    loop = batch.DecodeLoop(model, steps()[step](model))
    prefixes = [image(0)[:18], image(1)[:6]]
    runs = [loop.submit(model, p, 2, 36, SampleConfig(greedy=True)) for p in prefixes]
    for p, run in zip(prefixes, runs, strict=True):
        ref = generate(hf, with_start(p.expand(2, -1), 16), 36 - len(p))
        assert torch.equal(list(run)[-1][1], ref[:, 1:])


@pytest.mark.parametrize("step", STEPS)
def test_cancelled_request_leaves_and_frees_its_rows(step):
    """Closing one stream (a closed tab) drops its rows at the next step; the other request
    runs on, unchanged."""
    model, make_step = MODELS["wide"](), steps()[step]
    gate = Gate(make_step(model), hold_at={1, 3})
    loop = batch.DecodeLoop(model, gate, lanes=1)
    cfg = SampleConfig(seed=4)
    keep = loop.submit(model, image(1)[:6], 2, 36, cfg)
    gate.wait()
    drop = loop.submit(model, image(2)[:6], 3, 36, cfg)  # joins at step 2
    gate.release.set()
    stream = iter(drop)
    assert next(stream)[0] == 7  # the prefill's pixel
    gate.wait()  # step 3 is about to run with both requests
    stream.close()  # what happens to a generator Gradio abandons (a closed tab)
    assert drop.cancelled
    gate.release.set()
    got = list(keep)[-1][1]
    assert [sum(g) for g in gate.groups][:4] == [2, 5, 5, 2]
    assert drop.cache is None  # the loop let go of its keys and values
    assert torch.equal(got, alone(model, make_step, image(1)[:6], 2, cfg))
    deadline = time.time() + 10
    while loop.rows and time.time() < deadline:
        time.sleep(0.01)
    assert loop.rows == 0


@pytest.mark.parametrize("step", STEPS)
def test_requests_split_between_lanes_keep_their_samples(step):
    """Two lanes (threads), each stepping its own share of the requests: a request's
    samples are still the ones it gets alone."""
    model, make_step = MODELS["wide"](), steps()[step]
    inner, start, lanes_seen = make_step(model), threading.Event(), set()

    class Held:  # every step waits until all four requests are in, and says who ran it
        new_cache = inner.new_cache

        def __call__(self, tokens, group):
            assert start.wait(30)
            lanes_seen.add(threading.current_thread().ident)
            return inner(tokens, group)

    loop = batch.DecodeLoop(model, Held(), lanes=2)
    cfgs = [SampleConfig(seed=s) for s in range(4)]
    runs = [loop.submit(model, image(i)[:8], 2, 36, cfg) for i, cfg in enumerate(cfgs)]
    assert [lane.rows for lane in loop._lanes] == [4, 4]  # two requests each
    start.set()
    for i, (run, cfg) in enumerate(zip(runs, cfgs, strict=True)):
        assert torch.equal(list(run)[-1][1], alone(model, make_step, image(i)[:8], 2, cfg))
    assert len(lanes_seen) == 2


def test_a_failing_step_reaches_every_waiting_request_and_the_loop_recovers():
    model = MODELS["tiny"]()

    class Broken(batch.TorchStep):
        fail = True

        def __call__(self, tokens, group):
            if self.fail:
                raise RuntimeError("step failed")
            return super().__call__(tokens, group)

    step = Broken()
    loop = batch.DecodeLoop(model, step)
    runs = [loop.submit(model, image(i)[:10], 2, 36, SampleConfig(seed=i)) for i in range(2)]
    for run in runs:
        with pytest.raises(RuntimeError, match="step failed"):
            list(run)
    step.fail = False
    assert list(loop.submit(model, image(0)[:10], 2, 36, SampleConfig()))[-1][0] == 36


def test_one_loop_per_model_and_the_compiled_step_where_it_can_run(monkeypatch):
    a, b = MODELS["tiny"](), MODELS["tiny"]()
    assert batch.loop_for(a) is batch.loop_for(a) and batch.loop_for(a) is not batch.loop_for(b)
    assert batch.KernelStep.supports(a)
    monkeypatch.setattr(batch.KernelStep, "max_params", a.num_params() - 1)
    assert not batch.KernelStep.supports(a)  # too big to keep a packed copy
    monkeypatch.undo()
    a.kv_dtype = torch.bfloat16  # the int8 decoder's cache: PyTorch's step
    assert not batch.KernelStep.supports(a)
    assert isinstance(batch.step_for(a), batch.TorchStep)
    monkeypatch.setenv("EXPLORER_NATIVE", "0")
    assert isinstance(batch.step_for(b), batch.TorchStep)


def test_stream_checks_its_arguments():
    model = MODELS["tiny"]()
    with pytest.raises(ValueError, match="prefix"):
        list(batch.stream(model, image(0), 1, 36))  # nothing left to complete
    with pytest.raises(ValueError, match="sample"):
        list(batch.stream(model, image(0)[:4], 0, 36))


@pytest.fixture(scope="module")
def offline():
    from explorer.igpt.checkpoint import OFFLINE_NAME, load_igpt

    return load_igpt(OFFLINE_NAME)


def fashion_tokens(m, i: int) -> torch.Tensor:
    from PIL import Image

    from explorer.igpt.data import load_fashion_mnist
    from explorer.igpt.pipeline import image_tokens

    images, _ = load_fashion_mnist("test")
    return image_tokens(Image.fromarray(images[i].numpy(), "L"), m)[1]


def test_the_tabs_completions_share_one_loop_and_match_the_reference(offline, monkeypatch):
    """Two sessions complete their own images at once through the tab's path
    (`pipeline.stream_completions`): one loop runs both, and each gets the reference
    sampler's samples for its seed; a third session that closes its stream early leaves."""
    from explorer.igpt.pipeline import stream_completions
    from explorer.igpt.sampler import complete_stream
    from explorer.igpt.sequence import raster

    model = offline.model
    gate = Gate(batch.step_for(model), hold_at={2})
    monkeypatch.setitem(batch._loops, model, batch.DecodeLoop(model, gate, lanes=1))
    tokens = [fashion_tokens(offline, i) for i in (0, 1, 2)]
    cfgs = [SampleConfig(seed=0), SampleConfig(seed=5, top_k=3, temperature=0.9)]
    results = {}

    def session(i, n):
        results[i] = list(stream_completions(offline, tokens[i], 14, n, cfgs[i]))

    first = threading.Thread(target=session, args=(0, 4))
    first.start()
    gate.wait()
    second = threading.Thread(target=session, args=(1, 2))
    second.start()
    leaver = stream_completions(offline, tokens[2], 20, 3, SampleConfig(seed=1))
    gate.release.set()
    next(leaver)  # joins (the generator starts here), its first row is done; its tab closes
    leaver.close()
    first.join(120)
    second.join(120)
    with_leaver = [i for i, g in enumerate(gate.groups) if sorted(g) == [2, 3, 4]]
    assert with_leaver and len(with_leaver) < 40  # ~a row of steps, not its 8 rows
    assert all(3 not in g for g in gate.groups[with_leaver[-1] + 2:])
    for i, n in ((0, 4), (1, 2)):
        assert [t for t, _ in results[i]] == [28 * r for r in range(15, 29)]
        prefix = raster(tokens[i])[None, :14 * 28].expand(n, -1).contiguous()
        *_, ref = complete_stream(model, prefix, 784, cfgs[i])
        assert torch.equal(results[i][-1][1].flatten(1), ref)
