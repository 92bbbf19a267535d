"""explorer.batching: concurrent analyses share one forward; each caller gets its own part,
equal to what it gets alone."""

from __future__ import annotations

import threading

import pytest
import torch

from explorer import attention
from explorer.batching import MicroBatcher
from tests.odd_vit import SIZE, odd_vit


def _split(result, sizes):
    return list(torch.split(result, list(sizes)))


def _scaled(model, x, scale=1.0):
    return x * scale + model.weight.sum()


def _together(batcher, model, inputs, **kwargs):
    """Call ``batcher`` from one thread per input at once; the results in input order."""
    results, errors = [None] * len(inputs), []
    start = threading.Barrier(len(inputs))

    def call(i):
        start.wait()
        try:
            results[i] = batcher(model, inputs[i], **kwargs)
        except Exception as err:  # noqa: BLE001 (collected and checked by the test)
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_concurrent_calls_run_once_and_each_gets_its_own_rows():
    model = torch.nn.Linear(2, 2)
    batcher = MicroBatcher(_scaled, _split, wait_s=5.0, max_batch=4, devices=("cpu",))
    inputs = [torch.full((1, 3), float(i)) for i in range(3)] + [torch.zeros(1, 3)]
    results, errors = _together(batcher, model, inputs, scale=2.0)
    assert not errors and batcher.calls == 1  # four images: the batch was full, no waiting
    for x, got in zip(inputs, results, strict=True):
        assert torch.equal(got, x * 2.0 + model.weight.sum())


def test_other_shapes_and_settings_do_not_share_a_call():
    model = torch.nn.Linear(2, 2)
    batcher = MicroBatcher(_scaled, _split, wait_s=0.2, max_batch=8, devices=("cpu",))
    _, errors = _together(batcher, model, [torch.ones(1, 3), torch.ones(1, 4)])
    assert not errors and batcher.calls == 2
    alone = batcher(model, torch.ones(2, 3), scale=3.0)  # alone: runs after its wait
    assert batcher.calls == 3 and torch.equal(alone, torch.ones(2, 3) * 3.0 + model.weight.sum())


def test_an_error_reaches_every_caller_of_the_batch():
    def broken(model, x):
        raise ValueError("no")

    batcher = MicroBatcher(broken, _split, wait_s=5.0, max_batch=2, devices=("cpu",))
    _, errors = _together(batcher, torch.nn.Linear(1, 1), [torch.ones(1, 1), torch.ones(1, 1)])
    assert [str(e) for e in errors] == ["no", "no"] and batcher.calls == 1


def test_off_the_shared_devices_the_function_runs_as_it_is():
    batcher = MicroBatcher(_scaled, _split)  # shared on CUDA only
    model = torch.nn.Linear(2, 2)
    assert torch.equal(batcher(model, torch.ones(1, 3)), torch.ones(1, 3) + model.weight.sum())
    assert batcher.calls == 0


def _assert_same_maps(a, b):
    assert (a.grid, a.num_prefix_tokens, a.batch_size) == (b.grid, b.num_prefix_tokens, 1)
    for x, y in zip(a.q + a.k + a.head_mean, b.q + b.k + b.head_mean, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.token_norms, b.token_norms, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.probs(-1), b.probs(-1), atol=1e-5, rtol=1e-5)


def test_a_shared_capture_gives_each_image_the_maps_it_gets_alone():
    model = odd_vit()
    images = [torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(i))
              for i in range(3)]
    batcher = MicroBatcher(attention.capture, attention.AttentionMaps.split, wait_s=5.0,
                           max_batch=3, devices=("cpu",))
    shared, errors = _together(batcher, model, images)
    assert not errors and batcher.calls == 1
    for image, got in zip(images, shared, strict=True):
        _assert_same_maps(got, attention.capture(model, image))
        # a copy of its own rows: it does not keep the whole batch alive
        assert got.features.untyped_storage().nbytes() == got.features.nbytes


def test_split_checks_the_sizes():
    maps = attention.capture(odd_vit(), torch.randn(2, 3, SIZE, SIZE))
    assert [m.batch_size for m in maps.split([1, 1])] == [1, 1]
    assert maps.split([2])[0] is maps
    with pytest.raises(ValueError, match="do not add up"):
        maps.split([1])


def test_the_attention_tabs_capture_is_the_shared_one_and_plain_on_the_cpu():
    """`attention.shared_capture` (what the attention tab runs): on the CPU the capture
    itself, no waiting; it pickles by name, as a ZeroGPU call needs."""
    import importlib
    import pickle

    capture_module = importlib.import_module("explorer.attention.capture")  # not the function
    model, image = odd_vit(), torch.randn(1, 3, SIZE, SIZE)
    before = capture_module._SHARED.calls
    _assert_same_maps(attention.shared_capture(model, image), attention.capture(model, image))
    assert capture_module._SHARED.calls == before  # not batched on the CPU
    assert pickle.loads(pickle.dumps(attention.shared_capture)) is attention.shared_capture


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_concurrent_captures_share_one_forward():
    import importlib

    capture_module = importlib.import_module("explorer.attention.capture")
    model = odd_vit().cuda()
    images = [torch.randn(1, 3, SIZE, SIZE, device="cuda") for _ in range(4)]
    before = capture_module._SHARED.calls
    shared, errors = _together(attention.shared_capture, model, images)
    assert not errors and capture_module._SHARED.calls - before < len(images)
    for image, got in zip(images, shared, strict=True):
        _assert_same_maps(got, attention.capture(model, image))
