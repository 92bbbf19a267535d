"""iGPT tab: pixels as words. Colour tokens, raster order, completions and per-pixel surprise."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from explorer import sessions
from explorer.cache import KeyedCache
from explorer.errors import without_paths
from explorer.finetune.igpt_probe import load_probe_asset, middle_layer_peak, probe_summary
from explorer.igpt import domain, pipeline
from explorer.igpt import plots as igpt_plots
from explorer.igpt.checkpoint import CATALOGUE, OFFLINE_NAME, ModelUnavailableError, load_igpt
from explorer.igpt.data import CLASS_NAMES, DatasetUnavailableError, load_fashion_mnist
from explorer.igpt.sampler import SampleConfig
from explorer.igpt.sequence import attention_cost
from explorer.plots.finetune import probe_depth_figure
from explorer.ui import common, links
from explorer.ui.outputs import Outputs
from explorer.ui.presenter import TabLink

INTRO = """
**The naive solution: treat pixels as words** (iGPT, "Generative Pretraining from Pixels").
Colours are quantised to a small palette (the lecture's 9-bit palette: 3 bits per channel,
512 colours), pixels are read in raster order (row by row, left to right) after a start
token, and a GPT is trained to predict the next pixel. Hide the bottom of an image and it
paints it back, one pixel at a time. The catch: a sequence has one token per pixel, and
attention costs grow with its square.

The offline model was trained here on Fashion-MNIST (28×28, 8 grey levels); OpenAI's
`openai/imagegpt-small|medium|large` (32×32, 512 colour clusters) load from the Hub when
online; from Python, any local checkpoint directory works too.
"""

PROBE_CONTEXT = """
**The lecture's claim: "a linear classifier on iGPT representations".** Freeze the model, take
each block's output (after the final layer norm, averaged over the pixels) and fit a linear
classifier on it. The iGPT paper found the best features in the *middle* of the network: the
first half learns to understand the image, the last blocks specialise in predicting the next
pixel.

For scale, the lecture's table (CIFAR-10 linear probe, pre-trained on ImageNet; not comparable
with the Fashion-MNIST numbers on the left):

| model | accuracy | labels in pre-training |
|---|---|---|
| ResNet-152 | 94.0% | yes |
| SimCLR | 95.3% | no |
| iGPT-L 32×32 (1.4 B parameters) | 96.3% | no |
"""

EXAMPLE_CLASSES = (0, 1, 3, 7, 9, 8)  # T-shirt, trouser, dress, sneaker, ankle boot, bag
EXAMPLE_SCALE = 8  # examples are stored 224×224 (nearest): a box filter gives 28×28 back exactly
OTHER_SIZES = ((64, 64), (224, 224))
MAX_SAMPLES = 8


def fashion_mnist_examples() -> list[str]:
    """PNG paths of a few held-out Fashion-MNIST test images, one per class (written once)."""
    out = Path(tempfile.gettempdir()) / "vit-explorer-igpt-examples"
    images, labels = load_fashion_mnist("test")  # raises DatasetUnavailableError
    out.mkdir(exist_ok=True)
    paths = []
    for c in EXAMPLE_CLASSES:
        i = int((labels == c).nonzero()[0])
        path = out / f"fmnist-test-{i}-{CLASS_NAMES[c].split('/')[0].replace(' ', '-')}.png"
        if not path.exists():
            img = Image.fromarray(images[i].cpu().numpy(), "L")
            img.resize((28 * EXAMPLE_SCALE,) * 2, Image.NEAREST).save(path)
        paths.append(str(path))
    return paths


# Finished seeded completions (n, H, W) int64 tokens, by model, decoder, image tokens and
# settings: 8 x 28 x 28 int64 is 50 KB, so 256 of them stay under 13 MB.
COMPLETIONS: KeyedCache[torch.Tensor] = KeyedCache(max_items=256, max_bytes=16 * 2**20)

DECODERS = {
    "exact (fp32)": False,
    "fast (int8 weights, bf16 cache)": True,
}


def load_model(name: str, fast: bool = False):
    """The iGPT a web visitor named: catalogue or hub repo, never a path
    (`explorer.sessions.resolve_igpt_web_name`)."""
    try:
        return load_igpt(web_name(name), fast=fast)
    except ModelUnavailableError as err:
        raise gr.Error(without_paths(str(err))) from err


def web_name(name: str | None) -> str:
    return sessions.resolve_igpt_web_name(name, CATALOGUE, OFFLINE_NAME)


def analyse(image_path, model_name) -> dict:
    """Tokens, palette, raster sequence, 9-bit view, per-pixel bits, quadratic cost (the
    `/igpt_analyse` endpoint), by output name."""
    image = common.load_upload(image_path)
    m = load_model(model_name)
    small, tokens = pipeline.image_tokens(image, m)
    photo, photo9 = pipeline.in_rgb9(image)
    s = pipeline.surprise(m, tokens)
    dim = m.model.config.n_embd
    costs = [attention_cost(h, w, dim) for h, w in ((m.height, m.width), *OTHER_SIZES)]
    summary = (f"**{m.name}**: {m.height}×{m.width} pixels → {m.height * m.width} tokens + the "
               f"start token, palette: {m.palette.name} ({m.palette.size} colours).")
    return {"summary": summary, "photo9_caption": rgb9_caption(m), "small": igpt_plots.upscale(small),
            "quant": igpt_plots.tokens_to_image(tokens, m.palette, 10),
            "swatch": igpt_plots.palette_swatch(m.palette),
            "ribbon": igpt_plots.sequence_ribbon(tokens, m.palette), "photo": photo,
            "photo9": photo9, "heat": igpt_plots.bits_heatmap(s.bits, f"{s.bits_per_dim:.2f} bits/dim"),
            "bits": s.sentence(),
            "cost": igpt_plots.cost_table(costs, m.model.config.n_layer, m.model.config.n_head)}


RGB9_CAPTION = "... in the lecture's 9-bit palette (512 colours)"


def rgb9_caption(m) -> str:
    """The 9-bit row's caption: for a grey model, that it does not see these colours."""
    if not m.palette.is_grey:
        return RGB9_CAPTION
    return (f"... in the lecture's 9-bit palette (512 colours), for comparison only: this "
            f"model reads {m.palette.size} greys, never colour (see 'As the model sees it')")


def model_preview(image_path, model_name) -> dict:
    """Beside the upload (`/igpt_preview`): what the picked model knows
    (`explorer.igpt.domain`) and the upload as it receives it (its size, its palette); a
    model that cannot load here says why, at once."""
    try:
        m = load_model(model_name)
    except gr.Error as err:
        return {"domain": f"**This model cannot load here:** {err.message}", "seen": None}
    d = domain.model_domain(m)
    seen = None
    if image_path:
        seen = domain.model_view(common.load_upload(image_path), m)
    return {"domain": domain.domain_note(d), "seen": seen,
            "seen_caption": f"As the model sees it: {d.height}×{d.width}, "
                            + (f"{d.colours} greys" if d.grey else f"{d.colours} colours")}


def complete(image_path, model_name, rows, n, temperature, top_k, top_p, seed,
             decoder="exact (fp32)", progress=gr.Progress()):  # noqa: B008 (gradio injects it)
    """Stream N completions of the image below `rows` kept rows (the `igpt_complete` API).

    Yields:
        ``(grid image, status)`` as the completions grow.
    """
    if not 1 <= int(n) <= MAX_SAMPLES:
        raise gr.Error(f"Completions must be between 1 and {MAX_SAMPLES}.")
    if decoder not in DECODERS:
        raise gr.Error(f"Decoder must be one of: {', '.join(DECODERS)}.")
    try:
        cfg = SampleConfig(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                           seed=int(seed) if seed is not None else None)
    except ValueError as err:
        raise gr.Error(str(err)) from err
    image = common.load_upload(image_path)
    m = load_model(model_name, fast=DECODERS[decoder])
    _, tokens = pipeline.image_tokens(image, m)
    rows = max(0, min(int(rows), m.height - 1))
    start, total = rows * m.width, m.height * m.width
    scale = max(2, 1100 // ((int(n) + 1) * m.width))
    status = f"Original, then {int(n)} completions: {{}}/{total} pixels."
    # seeded completions are reproducible: a room completing the same example gets them
    # from memory (a fresh seed, None, is never kept)
    key = None if cfg.seed is None else (
        web_name(model_name), decoder, hashlib.sha1(tokens.cpu().numpy().tobytes()).hexdigest(),
        rows, int(n), cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    done = COMPLETIONS.get(key) if key is not None else None
    if done is not None:
        yield (igpt_plots.completion_grid(tokens[None], done[None], m.palette, rows, scale,
                                          filled=total), status.format(total) + " (kept)")
        return
    for filled, samples in pipeline.stream_completions(m, tokens, rows, int(n), cfg):
        progress((filled - start) / (total - start), desc=f"pixel {filled} of {total}")
        grid = igpt_plots.completion_grid(tokens[None], samples[None], m.palette, rows, scale,
                                          filled=filled)
        yield grid, status.format(filled)
    if key is not None:
        COMPLETIONS.put(key, samples)


def model_height(model_name) -> int | None:
    """The image height of an iGPT: from the catalogue when listed, else from the loaded
    model (local checkpoints); None when it cannot be loaded here."""
    spec = CATALOGUE.get(model_name or OFFLINE_NAME)
    if spec is not None and spec.height:
        return spec.height
    try:
        return load_igpt(web_name(model_name)).height
    except ModelUnavailableError:
        return None


def rows_slider(height: int | None) -> gr.Slider:
    """Keep-rows limits for an image ``height`` rows tall: keep 1 .. height - 1, half by default."""
    if height is None:
        return gr.Slider()
    return gr.Slider(maximum=height - 1, value=height // 2)


def rows_for_model(model_name):
    """Keep-rows slider for the chosen model (the `/igpt_model_rows` endpoint)."""
    return rows_slider(model_height(model_name))


def probe_text(probes, meta: dict) -> str:
    """The shipped layer-wise probe in words: split, and where each curve peaks."""
    if not probes:
        return "*No layer-wise probe result shipped (assets/igpt/probe.json is missing).*"
    lines = [f"- {probe_summary(p)}" for p in probes]
    igpt = probes[0]  # the asset lists the iGPT first
    verdict = ("**Like the paper, ours has its best features inside the network.**"
               if middle_layer_peak(igpt) else
               "**Unlike the paper, ours does not peak in the middle:** in this small model "
               f"({len(igpt.depths)} blocks, trained on 28×28 garments) accuracy rises, with "
               "noise, to the last block. The paper's peak came from much deeper models "
               "(iGPT-L: 48 blocks).")
    n_test = meta.get("n_test")
    noise = f" (standard error up to {100 * (0.25 / n_test) ** 0.5:.1f} points)" if n_test else ""
    return (f"Fashion-MNIST, {meta.get('split', '')}{noise}.\n\n" + "\n".join(lines)
            + f"\n\n{verdict}")


def build_probe_section() -> None:
    """The shipped layer-wise probe (assets/igpt/probe.json): a static plot and its context."""
    probes, meta = load_probe_asset()
    gr.Markdown("### What the model learned: a linear probe after every block")
    with gr.Row():
        with gr.Column(scale=3):
            gr.Plot(probe_depth_figure(probes, relative=True) if probes else None,
                    label="Linear-probe accuracy vs relative depth (block / number of blocks)",
                    elem_id="igpt-probe")
            gr.Markdown(probe_text(probes, meta), elem_id="igpt-probe-text")
        with gr.Column(scale=2):
            gr.Markdown(PROBE_CONTEXT, elem_id="igpt-probe-context")


def build_igpt_tab(ctx: common.TabContext) -> TabLink:
    """Components and events of the tab; call inside ``with gr.Tab("iGPT")``.

    Returns:
        What a link to this tab sets (`explorer.ui.presenter`): the image only (any
        bundled example; the model stays the tab's).
    """
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Row():
                image = common.upload_image(label="Image", height=220, elem_id="igpt-image",
                                            min_width=160)
                with gr.Column(min_width=160):  # beside the upload, not under it
                    seen_caption, seen = common.figure("As the model sees it", "igpt-seen",
                                                       format="png", height=220)
            try:
                gr.Examples(fashion_mnist_examples(), inputs=image, elem_id="igpt-examples",
                            label="Held-out Fashion-MNIST test images")
            except DatasetUnavailableError as err:
                gr.Markdown(f"*No Fashion-MNIST examples: {err}* Upload any image instead.")
            model = gr.Dropdown(list(CATALOGUE), value=OFFLINE_NAME, label="iGPT model",
                                allow_custom_value=True, elem_id="igpt-model",
                                info="Offline default; OpenAI's need internet (type a hub "
                                     "repo such as openai/imagegpt-small).")
            domain_md = gr.Markdown(elem_id="igpt-domain")
            run = gr.Button("Tokenise and score", variant="primary", elem_id="igpt-analyse",
                            interactive=False)  # until an image is there
        with gr.Column(scale=2):
            message = common.message_box("igpt")
            summary = gr.Markdown(elem_id="igpt-summary")
            with gr.Row():
                with gr.Column():
                    _, small = common.figure("1. Cropped and shrunk to the model's size (the "
                                             "upload's colours)", "igpt-small", format="png")
                with gr.Column():
                    _, quant = common.figure("2. Mapped to its palette: what the model reads",
                                             "igpt-quant", format="png")
            _, swatch = common.figure("The palette: token id → colour", "igpt-palette",
                                      format="png", height=140)
    _, ribbon = common.figure("The input sequence: start token (S), then pixels in raster "
                              "order (two image rows per line)", "igpt-sequence", format="png")
    with gr.Row():
        with gr.Column():
            _, photo = common.figure("Your image, as uploaded (the model never sees this)",
                                     "igpt-photo", format="png")
        with gr.Column():
            photo9_caption, photo9 = common.figure(RGB9_CAPTION, "igpt-rgb9", format="png")
    with gr.Row():
        heat = gr.Plot(label="Per-pixel surprise: -log2 p(pixel | pixels before it)",
                       elem_id="igpt-bits")
        with gr.Column():
            bits_md = gr.Markdown(elem_id="igpt-bits-text")
            cost_md = gr.Markdown(elem_id="igpt-cost")
    gr.Markdown("### Hide the bottom, let the model paint it back")
    with gr.Row():
        height = model_height(OFFLINE_NAME) or 2  # a catalogue entry: nothing is loaded here
        rows = gr.Slider(1, height - 1, value=height // 2, step=1, label="Rows to keep",
                         elem_id="igpt-rows")
        n = gr.Slider(1, MAX_SAMPLES, value=4, step=1, label="Completions", elem_id="igpt-n")
        temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature")
        top_k = gr.Slider(0, 64, value=0, step=1, label="Top-k (0 = off)")
        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (1 = off)")
        seed = gr.Number(value=0, precision=0, label="Seed")
    decoder = gr.Radio(list(DECODERS), value="exact (fp32)", label="Decoder",
                       elem_id="igpt-decoder",
                       info="fast: int8 weights and a bfloat16 cache, ~2x faster for big models "
                            "(iGPT-S and up) with nearly the same predictions; exact: fp32.")
    go = gr.Button("Complete", variant="primary", elem_id="igpt-complete",
                   interactive=False)  # until an image is there
    grid = gr.Image(label="Original (left), then completions: rows below the red ticks are "
                          "generated", format="png", interactive=False, elem_id="igpt-grid")
    status = gr.Markdown(elem_id="igpt-status")
    build_probe_section()

    out = Outputs(summary=summary, small=small, quant=quant, swatch=swatch, ribbon=ribbon,
                  photo=photo, photo9=photo9, heat=heat, bits=bits_md, cost=cost_md,
                  photo9_caption=photo9_caption, message=message)
    preview = Outputs(domain=domain_md, seen=seen, seen_caption=seen_caption)
    common.enable_with_image(image, run, go)
    shown_in = {"show_progress_on": [message]}  # failures said there, not over the controls
    analysed = run.click(**out.event(common.reported(analyse, "igpt")), inputs=[image, model],
                         validator=common.validator("image", None), api_name="igpt_analyse",
                         **shown_in, **ctx.analysis())
    completed = go.click(common.reported(complete, "igpt", clear=False),
                         inputs=[image, model, rows, n, temperature, top_k, top_p, seed, decoder],
                         outputs=[grid, status],
                         validator=common.validator("image", *[None] * 8),
                         api_name="igpt_complete", show_progress_on=[status, message],
                         **ctx.completions())
    for event in (analysed, completed):
        common.on_failure(event, "igpt", message)
    model.change(rows_for_model, inputs=model, outputs=rows, api_name="igpt_model_rows",
                 queue=False, show_progress="hidden")
    previewing = preview.event(common.reported(model_preview, "igpt", clear=False))
    previewed = gr.on([image.change, model.change], **previewing, inputs=[image, model],
                      api_name="igpt_preview", show_progress="hidden", **ctx.views())
    common.on_failure(previewed, "igpt", message)
    # on load too: the domain is said before anything is uploaded
    gr.on(None, **previewing, inputs=[image, model], api_name=False, show_progress="hidden",
          **ctx.views())
    return TabLink(links.IGPT, image, run_id="igpt-analyse")
