"""Two quick questions about the Hugging Face hub, asked before any download.

huggingface_hub retries a failed connection with exponential backoff, so an offline machine
asking for a model it never fetched waits through every retry, per file, before failing. A
TCP check of the endpoint answers "no internet" at once, and the local cache says whether the
files are there anyway; the ViT and iGPT loaders use both to fail fast with a clear message
(`tests/test_hub.py` checks that they do).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint (``HF_ENDPOINT``, else huggingface.co) accepts a connection;
    False at once in offline mode (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "0").lower() in (
            "1", "true", "yes"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection(
                (url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                timeout=timeout):
            return True
    except OSError:
        return False


def cached(repo_id: str, *filenames: str) -> bool:
    """Whether every one of ``filenames`` of ``repo_id`` (branch main) is in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    return all(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)
