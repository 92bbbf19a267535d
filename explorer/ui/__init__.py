"""Gradio wiring: each tab module builds its components and connects them to explorer."""
