"""ViT Explorer: see how Vision Transformers tokenise, attend and learn.

Analysis lives in pure modules (tensors in, tensors out); `explorer.plots` turns results
into figures; only `explorer.ui` and `app.py` import gradio.
"""
