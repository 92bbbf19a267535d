"""On a GPU, every analysis the tabs call gives the CPU's answer (skipped without CUDA).

`tests/test_device.py` proves on any machine that the analyses never mix devices (meta
device); this file runs them for real on CUDA where one exists (the lent GPU machine, a
Space with a GPU) and compares with the same analysis on the CPU. No gradio is imported, so
it runs where only torch and timm are installed.
"""

from __future__ import annotations

import pytest
import timm
import torch

from explorer import attention, distance, patches
from explorer.igpt.likelihood import pixel_nll_bits
from explorer.igpt.model import IGPTConfig, ImageGPT
from explorer.igpt.sampler import SampleConfig, complete
from explorer.ui import attention_view
from tests.odd_vit import odd_vit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def dinov2_like() -> torch.nn.Module:
    """The offline default's architecture (ViT-S/14, class token, 12 blocks), random weights."""
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518,
                             dynamic_img_size=True).eval()


def cls_reg_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, depth=2,
                             embed_dim=48, num_heads=3, reg_tokens=2, img_size=56,
                             dynamic_img_size=True, num_classes=5).eval()


MODELS = {"odd": odd_vit, "cls+reg": cls_reg_vit, "dinov2-s14": dinov2_like}


@pytest.fixture(params=list(MODELS))
def pair(request):
    """(cpu model, cuda model, cpu pixels, cuda pixels): same weights, a non-square input."""
    cpu = MODELS[request.param]()
    gpu = MODELS[request.param]().cuda()
    gpu.load_state_dict(cpu.state_dict())
    ph, pw = patches.patch_size(cpu)
    torch.manual_seed(1)
    x = torch.randn(1, 3, 4 * ph, 6 * pw)
    return cpu, gpu, x, x.cuda()


def close(gpu_value, cpu_value, atol=2e-4, rtol=1e-3):
    """The CUDA result, still on the GPU, equals the CPU's (TF32 is off in these tests)."""
    assert gpu_value.device.type == "cuda"
    torch.testing.assert_close(gpu_value.cpu(), cpu_value, atol=atol, rtol=rtol)


@pytest.fixture(autouse=True)
def exact_matmul():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_tokenisation(pair):
    cpu, gpu, x, xg = pair
    a, b = patches.analyse_tokenization(cpu, x), patches.analyse_tokenization(gpu, xg)
    # Principal components have arbitrary signs: a flipped component maps [0, 1] to 1 - x.
    for fb, fa in zip(b.filters, a.filters, strict=True):
        same = torch.allclose(fb.cpu(), fa, atol=2e-4, rtol=1e-3)
        assert same or torch.allclose(1 - fb.cpu(), fa, atol=2e-4, rtol=1e-3)
    close(b.pos_similarity_native, a.pos_similarity_native)
    close(b.pos_similarity, a.pos_similarity)


def test_attention_capture_and_views(pair):
    cpu, gpu, x, xg = pair
    ma, mb = attention.capture(cpu, x), attention.capture(gpu, xg)
    last = len(cpu.blocks) - 1
    close(mb.probs(last), ma.probs(last))
    va, vb = attention_view.attention_views(ma, last), attention_view.attention_views(mb, last)
    for field in ("heads", "fused", "per_layer", "rollout", "norms", "prefix_share"):
        close(getattr(vb, field), getattr(va, field))
    close(attention.attention_rollout(mb), attention.attention_rollout(ma))


def test_class_relevance(pair):
    cpu, gpu, x, xg = pair
    if not getattr(cpu, "num_classes", 0):
        pytest.skip("no classifier head")
    (ra, ta), (rb, tb) = attention.class_relevance(cpu, x), attention.class_relevance(gpu, xg)
    assert int(ta) == int(tb)
    close(rb, ra, atol=1e-4, rtol=1e-2)


def test_mean_attention_distance(pair):
    cpu, gpu, x, xg = pair
    close(distance.model_mean_attention_distance(gpu, xg),
          distance.model_mean_attention_distance(cpu, x), atol=1e-2, rtol=1e-3)


def igpt_pair() -> tuple[ImageGPT, ImageGPT]:
    """(cpu, cuda) copies of one small random iGPT."""
    torch.manual_seed(0)
    cfg = IGPTConfig(vocab_size=9, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    cpu = ImageGPT(cfg).eval()
    gpu = ImageGPT(cfg).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


def test_igpt_likelihood_and_greedy_completion():
    cpu, gpu = igpt_pair()
    tokens = torch.randint(0, 8, (3, 8, 8))
    close(pixel_nll_bits(gpu, tokens), pixel_nll_bits(cpu, tokens), atol=1e-3, rtol=1e-3)
    prefix = tokens.flatten(1)[:, :24]
    greedy = SampleConfig(greedy=True)
    out = complete(gpu, prefix, 64, greedy)
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), complete(cpu, prefix, 64, greedy))


def test_igpt_decode_loop_on_cuda_matches_the_cpu():
    """The shared loop's PyTorch step on a CUDA model: greedy rows equal the CPU's."""
    from explorer.igpt import batch

    cpu, gpu = igpt_pair()
    assert isinstance(batch.step_for(gpu), batch.TorchStep)  # the kernel is CPU-only
    prefix = torch.randint(0, 8, (24,))
    greedy = SampleConfig(greedy=True)
    got = list(batch.DecodeLoop(gpu, lanes=1).submit(gpu, prefix, 2, 64, greedy))[-1][1]
    assert torch.equal(got.cpu(), complete(cpu, prefix.expand(2, -1).contiguous(), 64, greedy))


def test_gpu_results_cross_to_the_cpu():
    from explorer.gpu import to_cpu

    x = torch.ones(3, device="cuda")
    out = to_cpu({"maps": [x, (x, 1)]})
    assert out["maps"][0].device.type == "cpu" and out["maps"][1][0].device.type == "cpu"
