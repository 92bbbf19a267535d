"""The one error for "this model cannot be loaded here", shared by the ViT and iGPT loaders."""

from __future__ import annotations


class ModelUnavailableError(RuntimeError):
    """A model cannot be loaded here (no internet, missing or unreadable files, unknown name).

    The message is meant for a person, not a traceback: the UI shows it as it is.
    """
