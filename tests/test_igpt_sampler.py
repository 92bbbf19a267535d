"""The KV-cache sampler: greedy equality with transformers' generate, filtering, seeds."""

import math

import pytest
import torch

from explorer.igpt.model import ImageGPT
from explorer.igpt.sampler import SampleConfig, complete, complete_stream, filter_logits, shares_prefix
from explorer.igpt.sequence import with_start
from tests.igpt_helpers import known_distribution_model, tiny_hf


def generate(hf, input_ids: torch.Tensor, new: int) -> torch.Tensor:
    """transformers' greedy `generate` with its KV cache. The attention mask is explicit:
    otherwise generate would derive one from pad_token_id and could mask the start token."""
    return hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                       pad_token_id=0)


def test_greedy_equals_transformers_generate():
    hf = tiny_hf(seed=1)
    ours = ImageGPT.from_hf(hf)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 16, (3, 18), generator=g)  # keep the top 3 of 6 rows
    got = complete(ours, prefix, 36, SampleConfig(greedy=True))
    ref = generate(hf, with_start(prefix, 16), 18)
    assert got.shape == (3, 36)
    assert torch.equal(got[:, :18], prefix)  # the kept rows are untouched
    assert torch.equal(got, ref[:, 1:])  # ref starts with the start token


def test_shared_prefix_greedy_equals_transformers_generate():
    # n completions of one image: the known pixels are prefilled once and shared
    hf = tiny_hf(seed=1)
    ours = ImageGPT.from_hf(hf)
    prefix = torch.randint(0, 16, (1, 18), generator=torch.Generator().manual_seed(0))
    prefix = prefix.expand(3, 18)
    assert shares_prefix(ours, prefix)
    got = complete(ours, prefix, 36, SampleConfig(greedy=True))
    assert torch.equal(got, generate(hf, with_start(prefix, 16), 18)[:, 1:])


def test_shared_prefix_samples_equal_the_per_sample_cache():
    # the same random draws through both caches give the same pixels; the shared cache reads
    # one copy of the prefix's keys/values
    ours = ImageGPT.from_hf(tiny_hf(seed=4, std=0.05))
    one = torch.randint(0, 16, (1, 14), generator=torch.Generator().manual_seed(1))
    prefix = one.expand(5, 14)
    shared = [s.clone() for s in complete_stream(ours, prefix, 36, SampleConfig(seed=3))]
    ours.kv_dtype = torch.float32  # an explicit cache dtype turns the shared cache off
    assert not shares_prefix(ours, prefix)
    separate = [s.clone() for s in complete_stream(ours, prefix, 36, SampleConfig(seed=3))]
    assert len(shared) == len(separate) == 22
    assert all(torch.equal(a, b) for a, b in zip(shared, separate, strict=True))
    assert not torch.equal(shared[-1][0], shared[-1][1])  # the samples still differ
    assert not shares_prefix(ours, torch.stack([one[0], one[0].flip(0)]))


def test_greedy_from_empty_prefix_equals_generate():
    hf = tiny_hf(seed=2)
    ours = ImageGPT.from_hf(hf)
    got = complete(ours, torch.zeros(2, 0, dtype=torch.long), 36, SampleConfig(greedy=True))
    ref = generate(hf, torch.full((2, 1), 16), 36)
    assert torch.equal(got, ref[:, 1:])


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True]]
    assert torch.equal(out[torch.isfinite(out)], torch.tensor([4.0, 3.0]))


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.7) == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert kept(0.9) == [True, True, True, False]  # 0.8 < 0.9 <= 0.95
    assert kept(1.0) == [True, True, True, True]


def test_top_p_works_on_unsorted_rows():
    logits = torch.tensor([[0.05, 0.15, 0.5, 0.3], [0.3, 0.5, 0.05, 0.15]]).log()
    kept = torch.isfinite(filter_logits(logits, top_p=0.7)).tolist()
    assert kept == [[False, False, True, True], [True, True, False, False]]


def test_top_k_1_and_cold_temperature_are_greedy():
    ours = ImageGPT.from_hf(tiny_hf(seed=3))
    prefix = torch.randint(0, 16, (2, 12))
    greedy = complete(ours, prefix, 36, SampleConfig(greedy=True))
    assert torch.equal(complete(ours, prefix, 36, SampleConfig(top_k=1, seed=5)), greedy)
    assert torch.equal(complete(ours, prefix, 36, SampleConfig(temperature=1e-5, seed=5)),
                       greedy)


def test_samples_stay_inside_top_k():
    ours = ImageGPT.from_hf(tiny_hf(seed=3))
    prefix = torch.randint(0, 16, (4, 30))
    with torch.no_grad():
        seq = with_start(prefix, 16)
        top3 = ours(seq)[:, -1].topk(3).indices  # (4, 3): candidates for pixel 30
    out = complete(ours, prefix, 31, SampleConfig(top_k=3, seed=0))
    assert all(out[i, 30] in top3[i] for i in range(4))


def test_seed_reproducibility():
    ours = ImageGPT.from_hf(tiny_hf(seed=4, std=0.05))  # flat-ish distributions: samples vary
    prefix = torch.randint(0, 16, (4, 6))
    a = complete(ours, prefix, 36, SampleConfig(seed=7))
    b = complete(ours, prefix, 36, SampleConfig(seed=7))
    c = complete(ours, prefix, 36, SampleConfig(seed=8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # samples in one batch differ from each other


def test_sampling_frequencies_follow_the_distribution():
    # 1 position, many samples: empirical frequencies of colour 0 under top_p=0.7 must match
    # the renormalised probability 0.5 / 0.8
    m = known_distribution_model(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    out = complete(m, torch.zeros(4000, 0, dtype=torch.long), 1, SampleConfig(top_p=0.7, seed=0))
    assert set(out.unique().tolist()) == {0, 1}
    freq0 = (out == 0).float().mean().item()
    assert math.isclose(freq0, 0.625, abs_tol=0.03)


def test_stream_yields_one_pixel_per_step():
    ours = ImageGPT.from_hf(tiny_hf())
    prefix = torch.randint(0, 16, (2, 30))
    steps = [s.clone() for s in complete_stream(ours, prefix, 36, SampleConfig(seed=0))]
    assert len(steps) == 6
    assert torch.equal(steps[-1], complete(ours, prefix, 36, SampleConfig(seed=0)))


def test_bad_settings_raise_clear_errors():
    for kwargs, msg in [({"temperature": 0}, "temperature"), ({"top_k": -1}, "top-k"),
                        ({"top_p": 0.0}, "top-p"), ({"top_p": 1.5}, "top-p")]:
        with pytest.raises(ValueError, match=msg):
            SampleConfig(**kwargs)
