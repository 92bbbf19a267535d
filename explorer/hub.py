"""Two quick questions about the Hugging Face hub, asked before any download.

huggingface_hub retries a failed connection with exponential backoff, so an offline machine
asking for a model it never fetched waits through every retry, per file, before failing. A
TCP check of the endpoint answers "no internet" at once, and the local cache says whether the
files are there anyway; the ViT and iGPT loaders use both to fail fast with a clear message
(`tests/test_hub.py` checks that they do). `file_bytes` asks how big a download would be,
so the web pickers can refuse a hub model too big for the server (`explorer.sessions`).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint (``HF_ENDPOINT``, else huggingface.co) accepts a connection;
    False at once in offline mode (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    # huggingface_hub's own switch, not a setting of ours: it reads HF_HUB_OFFLINE once, at
    # import, so the variable is read here too, where it acts, for one set later on.
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


def file_bytes(repo_id: str, filenames) -> int | None:
    """Size in bytes of the first of ``filenames`` that ``repo_id`` (branch main) has, asked
    with one HEAD request each (nothing is downloaded); None if it has none of them."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError

    for name in filenames:
        try:
            return int(get_hf_file_metadata(hf_hub_url(repo_id, name), timeout=10).size)
        except EntryNotFoundError:
            continue
        except HfHubHTTPError as err:
            if getattr(err.response, "status_code", None) == 404:
                continue
            raise
    return None
