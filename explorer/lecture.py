"""The lecture "Vision Transformers" (ML@B Edu) as data: its steps in order, and its numbers.

Each step names the live view that illustrates it (`Step.figure`, built by
`explorer.ui.lecture_tab`) and the tab a link opens, prepared the same way. The numbers in
`PAPER_*` are copied from the lecture's slides (which quote the papers); nothing here is
measured by the app, and every figure built from them says so.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One stop on the lecture's path.

    Attributes:
        title: the slide's idea in a few words.
        text: two or three plain sentences (Markdown).
        figure: which live view illustrates it (a key of `explorer.ui.lecture_tab.FIGURES`).
        tab: the tab a link opens for the full view (see `explorer.ui.links.TABS`).
        caption: what the figure shows, also the start of its download's file name.
    """

    title: str
    text: str
    figure: str
    tab: str
    caption: str


STEPS: tuple[Step, ...] = (
    Step("Text tokens",
         "A transformer reads a **sequence of tokens**: text is cut into tokens, each looked up "
         "as an embedding vector, given a position embedding, and passed through stacked "
         "attention + MLP blocks. To use it on images we first have to turn a picture into "
         "such a sequence; here is the current image read as one.",
         "sequence", "tokens", "token-sequence"),
    Step("Pixels as words (iGPT)",
         "The naive way: treat every pixel as a word. 24-bit colour would need 16.7 million "
         "words, so iGPT uses a **9-bit palette** (8 levels per channel, 512 colours) and reads "
         "pixels in **raster order**, row by row. But attention costs grow with the square of "
         "the sequence, and the sequence grows with the square of the side: a 256×256 image is "
         "65,536 tokens (BERT reads 512), so iGPT stops at 64×64.",
         "rgb9", "igpt", "9-bit-palette"),
    Step("Patches and a linear projection",
         "\"An image is worth 16x16 words\": instead of pixels, cut the image into **patches**, "
         "flatten each and project it linearly to one token. A 224 px image becomes 196 tokens "
         "of 16×16 px instead of 50,176 pixel tokens. The grid below shows each patch with its "
         "token index.",
         "patches", "tokens", "patch-grid"),
    Step("Position embeddings and their interpolation",
         "Attention alone does not know where a patch is, so each token gets a learned "
         "**position embedding**. Each tile shows how similar one patch's embedding is to all "
         "others: nearby patches, rows and columns light up. Trained at low resolution and "
         "fine-tuned higher, the embeddings are **interpolated** to the bigger grid (try "
         "another size in the link).",
         "positions", "tokens", "position-similarity"),
    Step("Attention and rollout",
         "In every block each token takes a weighted average of all tokens, weights from "
         "softmax(QKᵀ/√d). **Rollout** chains the attention of all layers (counting the "
         "residual path) to show which patches reach the class token: mostly the object.",
         "rollout", "attention", "attention-rollout"),
    Step("A global receptive field, unlike a CNN",
         "A convolution sees only its kernel, so a CNN's receptive field grows layer by "
         "layer. A ViT's attention can reach the whole image from the first block. Each dot "
         "is one head's mean attention distance: some early heads already look far, and the "
         "distance grows with depth.",
         "distance", "distance", "mean-attention-distance"),
    Step("Inductive bias and data",
         "CNNs build in locality, 2-D neighbourhoods and translation equivariance; a ViT "
         "has far fewer such assumptions and must **learn them from data**, so the lecture "
         "says it does worse than a CNN on little data and better with a lot. Below, the "
         "experiment **run here**: four ~0.2 M-parameter models trained from scratch, until "
         "they converge, on 500 to 60,000 Fashion-MNIST images (the lab tab adds the same "
         "models on scrambled images, the paper's ImageNet numbers, and a live run).",
         "lab-data", "lab", "lab-error-vs-training-images"),
    Step("Scaling",
         "\"Scaling Vision Transformers\": error falls when data, model size and compute grow "
         "together, and bigger models are more sample-efficient (a 2B-parameter ViT reached "
         "the ImageNet state of the art). Below, ViTs of four widths trained here, error against "
         "training compute: the dashed line is the best any size reached within each budget.",
         "lab-compute", "lab", "lab-error-vs-training-compute"),
    Step("CoAtNet: convolution meets relative attention",
         "CoAtNet adds *some* inductive bias back: early MBConv (MobileNetV2 convolution) "
         "stages, then attention with a weight that depends only on the **relative position** "
         "i−j: softmax over j of xᵢᵀxⱼ + w₍ᵢ₋ⱼ₎. Below, the learned w of every head of the "
         "relative-attention ViT trained here: a (2H−1)×(2W−1) image centred on the query.",
         "lab-bias", "lab", "lab-relative-position-bias"),
)

# The lecture's slide "Nice results!" (ViT paper, Table 2): ImageNet top-1 % and the
# pre-training compute in TPUv3-core-days.
PAPER_IMAGENET = (
    # (model, pre-training data, ImageNet top-1 %, TPUv3-core-days)
    ("ViT-H/14", "JFT-300M", 88.55, 2500),
    ("ViT-L/16", "JFT-300M", 87.76, 680),
    ("ViT-L/16", "ImageNet-21k", 85.30, 230),
    ("BiT-L (ResNet152x4)", "JFT-300M", 87.54, 9900),
    ("Noisy Student (EfficientNet-L2)", "JFT-300M", 88.4, 12300),
)
PAPER_SOURCE = "ViT paper (Dosovitskiy et al. 2021), Table 2, as quoted in the lecture"
