"""The one error for "this model cannot be loaded here", shared by the ViT and iGPT loaders."""

from __future__ import annotations

import re


class ModelUnavailableError(RuntimeError):
    """A model cannot be loaded here (no internet, missing or unreadable files, unknown name).

    The message is meant for a person, not a traceback: the UI shows it as it is.
    """


# An absolute or home path: "/" or "~/" where a word starts, then path characters. Hub ids
# ("hf-hub:owner/name", "openai/imagegpt-small") have a word character before their "/".
_PATH = re.compile(r"(?<![\w:.-])~?/(?:[^\s'\"/()]+/)*([^\s'\"/()]+)")


def without_paths(message: str) -> str:
    """``message`` with every absolute path shortened to its last part: a last line of
    defence for messages shown to web visitors (libraries put paths in their errors)."""
    return _PATH.sub(lambda m: m.group(1), message)
