"""iGPT, the lecture's "naive solution": pixels as words.

- `palette`: colours -> tokens and back (9-bit RGB, OpenAI's k-means clusters, grey levels)
- `sequence`: the raster-order token sequence with its start token; the quadratic cost
- `model`: a small, fast ImageGPT in plain PyTorch, weight-compatible with transformers
- `sampler`: completions with a preallocated key/value cache (temperature, top-k, top-p, seed)
- `likelihood`: per-pixel negative log-likelihood in bits, bits/dim
- `checkpoint`: the model catalogue (offline Fashion-MNIST model, OpenAI's on the Hub, local)
- `pipeline`: picture -> tokens, completions, surprise (what the UI tab shows)
- `plots`: PIL / plotly pictures of the above
- `train`: `python -m explorer.igpt.train` (accelerate; CPU or GPUs), `showcase`: README grid

No gradio here; the tab lives in `explorer.ui.igpt_tab`.
"""
