"""Figures and display images built from analysis results (no gradio)."""
