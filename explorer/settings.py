"""Every setting of ViT Explorer in one object, read once: the command line over the environment.

`Settings` lists them, each with its default, its environment variable (a Space's
"Variables") and its flag for ``python app.py``; `Settings.parse` reads both once at start
and the app passes the result down (`app.build_demo`, `explorer.tuning.tune`). The README's
"Settings" table lists the same fields.

Nothing else reads the environment for a setting, save switches that must act before this
module can be asked, each read where it acts: the Triton opt-out ``VIT_EXPLORER_TRITON``
(`explorer.keep_triton_out`, before torch is imported), the native kernels'
``EXPLORER_NATIVE`` / ``EXPLORER_KERNEL_CACHE`` (`explorer.kernels`) and the platform's
``SPACES_ZERO_GPU`` (`explorer.gpu`, as the ``spaces`` package reads it).

Code that also runs outside the app (the converted-weights cache, Fashion-MNIST, the CLIs)
asks `current()`: the settings the app installed at start, else these fields read from the
environment once.
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(text: str) -> bool:
    text = text.strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ValueError(f"not one of {', '.join(TRUE + FALSE)}")


def _setting(default: Any, env: str | None, help: str, parse: Callable[[str], Any] | None = None):
    """A field of `Settings`: its default, the variable that sets it (None: flag only), how a
    value is read from text, and one line for ``--help`` and the README."""
    metadata = {"env": env, "help": help, "parse": parse or type(default)}
    if callable(default) and not isinstance(default, type):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


def _cache_home() -> Path:
    return Path.home() / ".cache" / "vit-explorer"


@dataclass(frozen=True)
class Settings:
    """The app's settings. Each field is set by ``--<field-name>`` (``_`` as ``-``) or by the
    variable in its metadata, and says what it does there; defaults suit a 2-core CPU Space."""

    # -- serving --------------------------------------------------------------------------
    host: str = _setting("127.0.0.1", "GRADIO_SERVER_NAME",
                         "interface to listen on (0.0.0.0 for a LAN or a container)")
    port: int = _setting(7860, "GRADIO_SERVER_PORT", "port to listen on")
    share: bool = _setting(False, None, "also open a temporary public gradio.live link "
                                        "(needs internet)", _flag)
    models_dir: Path | None = _setting(
        None, "VIT_EXPLORER_MODELS_DIR", "folder of checkpoints in timm's layout "
        "(config.json + model.safetensors per sub-folder), offered by folder name in every "
        "model picker", Path)
    data_dir: Path | None = _setting(
        None, "VIT_EXPLORER_DATA_DIR", "folder of image folders, each offered by name "
        "('data: <folder>') as a dataset of the distance tab's band", Path)
    # -- files the analysis reads ---------------------------------------------------------
    cache_dir: Path = _setting(_cache_home, "VIT_EXPLORER_CACHE",
                               "converted offline weights and fine-tuned checkpoints "
                               "(default $XDG_CACHE_HOME/vit-explorer, else ~/.cache/vit-explorer)",
                               Path)
    fashion_mnist_dir: Path = _setting(Path("/usr/share/datasets/fashion-mnist"),
                                       "VIT_EXPLORER_FASHION_MNIST",
                                       "folder of Fashion-MNIST's four IDX .gz files (Debian's "
                                       "dataset-fashion-mnist)", Path)
    # -- the queue and what is kept -------------------------------------------------------
    concurrency: int = _setting(2, "VIT_EXPLORER_CONCURRENCY",
                                "analyses (forward passes) run at once; more share the same "
                                "cores and slow everyone")
    view_concurrency: int = _setting(4, "VIT_EXPLORER_VIEW_CONCURRENCY",
                                     "re-renders from kept results (sliders, clicks) run at "
                                     "once, in their own group")
    completion_concurrency: int = _setting(
        16, "VIT_EXPLORER_COMPLETION_CONCURRENCY",
        "iGPT completions in flight at once, in their own group: they share one decode loop "
        "(explorer.igpt.batch), so more in flight means bigger batches, not more threads")
    decode_lanes: int | None = _setting(
        None, "VIT_EXPLORER_DECODE_LANES",
        "threads stepping the shared iGPT decode loop, each with its share of the running "
        "completions (default: one per core)", int)
    queue_size: int = _setting(64, "VIT_EXPLORER_QUEUE", "requests that may wait in the queue")
    store_mb: float = _setting(384.0, "VIT_EXPLORER_STORE_MB",
                               "memory for every session's kept results together (least "
                               "recently used go first)")
    max_models: int = _setting(3, "VIT_EXPLORER_MAX_MODELS", "ViTs kept loaded at once")
    # -- the process (`explorer.tuning`) --------------------------------------------------
    torch_threads: int | None = _setting(
        None, "VIT_EXPLORER_TORCH_THREADS",
        "torch threads per request (default: the cores divided by --concurrency)", int)
    gil_switch_ms: float = _setting(1.0, "VIT_EXPLORER_GIL_SWITCH_MS",
                                    "how often the GIL changes hands, ms (Python's own: 5)")
    malloc_arenas: int | None = _setting(
        2, "VIT_EXPLORER_MALLOC_ARENAS",
        "glibc malloc arenas (glibc's own MALLOC_ARENA_MAX, read at process start, wins)", int)
    malloc_trim_s: float = _setting(0.25, "VIT_EXPLORER_MALLOC_TRIM_S",
                                    "hand freed heap memory back to the system every this many "
                                    "seconds (0: off)")
    train_in_child: bool = _setting(True, "VIT_EXPLORER_TRAIN_IN_CHILD",
                                    "train the lab's live runs in a child process that keeps "
                                    "its heap (CPU only; off: in the app's process)",
                                    _flag)
    # -- what web visitors may do (`explorer.sessions`) -----------------------------------
    finetune_quota_mb: float = _setting(2000.0, "VIT_EXPLORER_FINETUNE_QUOTA_MB",
                                        "disk for all sessions' fine-tunes together (the "
                                        "oldest goes first)")
    finetunes_per_session: int = _setting(3, "VIT_EXPLORER_FINETUNES_PER_SESSION",
                                          "fine-tunes a session keeps (its oldest goes first)")
    session_idle_s: float = _setting(3600.0, "VIT_EXPLORER_SESSION_IDLE_S",
                                     "a session idle this long loses its fine-tunes")
    share_finetunes: bool = _setting(False, "VIT_EXPLORER_SHARE_FINETUNES",
                                     "every session sees every fine-tune (a lecture)", _flag)
    max_hub_mb: float = _setting(400.0, "VIT_EXPLORER_MAX_HUB_MB",
                                 "largest hub download a web visitor may start, MB")
    web_hub: bool = _setting(True, "VIT_EXPLORER_WEB_HUB",
                             "web visitors may type hub models (off: only the models listed)",
                             _flag)
    lab_steps: int | None = _setting(
        None, "VIT_EXPLORER_LAB_STEPS",
        "optimisation steps of a live lab run (default: the lab's live budget, "
        "explorer.lab.engine.LIVE_BUDGET)", int)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings the environment gives (unset variables keep their defaults).

        Raises:
            ValueError: naming the variable whose value cannot be read.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata["env"]
            if name and env.get(name, "").strip():
                try:
                    values[f.name] = f.metadata["parse"](env[name].strip())
                except ValueError as err:
                    raise ValueError(f"{name}={env[name]!r}: {err}") from err
        if "cache_dir" not in values and env.get("XDG_CACHE_HOME"):
            values["cache_dir"] = Path(env["XDG_CACHE_HOME"]) / "vit-explorer"
        if env.get("MALLOC_ARENA_MAX"):  # glibc applied its own cap at start: leave it
            values["malloc_arenas"] = None
        return cls(**values)

    @classmethod
    def parse(cls, argv: Sequence[str] | None = None,
              environ: Mapping[str, str] | None = None) -> Settings:
        """``python app.py``'s flags over the environment (`from_env`) over the defaults."""
        base = cls.from_env(environ)
        parser = argparse.ArgumentParser(
            description="ViT Explorer: a Gradio app for Vision Transformers. Every flag can "
                        "also be set by the environment variable named in its help.")
        for f in fields(cls):
            default, env = getattr(base, f.name), f.metadata["env"]
            text = f.metadata["help"] + (f"; ${env}" if env else "")
            flag = "--" + f.name.replace("_", "-")
            if f.metadata["parse"] is _flag:
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                    default=default,
                                    help=f"{text} (now: {'on' if default else 'off'})")
            else:
                now = "" if default is None else f" (now: {default})"  # None: see the help
                parser.add_argument(flag, dest=f.name, type=f.metadata["parse"], default=default,
                                    metavar=f.name.upper(), help=text + now)
        return replace(base, **vars(parser.parse_args(argv)))


_current: Settings | None = None
_lock = threading.Lock()


def current() -> Settings:
    """The settings this process runs with: the app's (`install`), else the environment's,
    read on first use."""
    global _current
    with _lock:
        if _current is None:
            _current = Settings.from_env()
        return _current


def install(settings: Settings) -> None:
    """Make ``settings`` what `current` returns (the app does this once, at start)."""
    global _current
    with _lock:
        _current = settings
