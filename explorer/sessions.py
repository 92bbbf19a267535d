"""Which models a web visitor may name, and the fine-tunes each browser session owns.

A public Space serves every visitor from one process, so two questions need one answer each:

- `resolve_web_name`: a model name typed or picked in the UI becomes the name `load_vit`
  loads, or is refused. Allowed: catalogue names, operator models (registered from Python
  or ``--models-dir``), this session's fine-tunes, and hub ids. ``local:<path>`` and
  anything path-like are refused with a message that names no path; they keep working from
  Python and the CLI, which call `explorer.models.load_vit` directly.
- `SessionModels`: a fine-tuned model belongs to the session that trained it (perhaps on
  private photos). It is listed and loadable there only (everywhere with
  ``VIT_EXPLORER_SHARE_FINETUNES=1``), and its files are deleted when the session ends,
  after an idle time, or when the global disk quota needs room (oldest first).

No gradio here: the UI passes gradio's ``session_hash`` as the session id. Limits come from
the environment at each use (`SessionLimits.from_env`), so an operator sets them per deploy:

====================================  =======  ==============================================
``VIT_EXPLORER_FINETUNE_QUOTA_MB``    2000     disk for all sessions' fine-tunes together
``VIT_EXPLORER_FINETUNES_PER_SESSION`` 3       a session's newest kept; the oldest goes first
``VIT_EXPLORER_SESSION_IDLE_S``       3600     a session idle this long loses its fine-tunes
``VIT_EXPLORER_SHARE_FINETUNES``      0        1: every session sees every fine-tune (a lecture)
====================================  =======  ==============================================
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from explorer import hub, models
from explorer.errors import ModelUnavailableError

# A Hugging Face repo id ("owner/name") and a timm name ("arch.tag") share one alphabet:
# letters, digits, "-", "_", "." (huggingface_hub's validate_repo_id), never starting with
# "." or "-" and never holding "..": so no leading "/", ".", "~", no backslash, no "..".
_HUB_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}"
TIMM_NAME = re.compile(rf"^{_HUB_PART}$")
REPO_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")

REFUSED = ("Model names typed here are catalogue names, hub ids ('arch.tag', "
           "'hf-hub:owner/name') or models fine-tuned in this session; file paths and "
           "'local:' are not accepted from the web (an operator adds local models with "
           "--models-dir).")


def is_hub_id(name: str, repo_only: bool = False) -> bool:
    """Whether ``name`` reads as a hub id and cannot be read as a path.

    Args:
        name: a timm name (``vit_small_patch16_224.dino``), ``hf-hub:owner/name``, or (with
            ``repo_only``) a bare repo id ``owner/name`` as transformers takes it.
        repo_only: accept ``owner/name`` without the ``hf-hub:`` prefix (iGPT), not a timm
            name.
    """
    if ".." in name:
        return False
    if repo_only:
        return bool(REPO_ID.match(name))
    if name.startswith("hf-hub:"):
        return bool(REPO_ID.match(name[len("hf-hub:"):]))
    return bool(TIMM_NAME.match(name))


@dataclass(frozen=True)
class SessionLimits:
    """Disk and lifetime bounds for fine-tunes (see the module docstring for the variables)."""

    quota_bytes: int = 2000 << 20
    per_session: int = 3
    idle_s: float = 3600.0
    shared: bool = False

    @classmethod
    def from_env(cls) -> SessionLimits:
        env = os.environ.get
        return cls(quota_bytes=int(float(env("VIT_EXPLORER_FINETUNE_QUOTA_MB", "2000")) * (1 << 20)),
                   per_session=max(1, int(env("VIT_EXPLORER_FINETUNES_PER_SESSION", "3"))),
                   idle_s=float(env("VIT_EXPLORER_SESSION_IDLE_S", "3600")),
                   shared=env("VIT_EXPLORER_SHARE_FINETUNES", "0").lower() in ("1", "true", "yes"))


@dataclass
class SessionModel:
    """One fine-tuned model of one session.

    Attributes:
        name: the picker name; unique and unguessable (it ends in a random token).
        session: the owning session id.
        checkpoint: the checkpoint directory (timm's layout).
        files: every path deleted with the model (checkpoint dir, download folder).
        created: `time.time()` when added.
        nbytes: disk bytes of ``files``.
    """

    name: str
    session: str
    checkpoint: Path
    files: tuple[Path, ...]
    created: float = field(default_factory=time.time)
    nbytes: int = 0

    @property
    def load_name(self) -> str:
        """What `explorer.models.load_vit` loads (server-side only, never shown)."""
        return f"local:{self.checkpoint}"


def disk_bytes(paths) -> int:
    """Bytes of the files under ``paths`` (files or folders; missing ones count 0)."""
    total = 0
    for p in map(Path, paths):
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


def unguessable_name(label: str) -> str:
    """``fine-tuned: <label>-<random>``: another session cannot type it by chance."""
    return f"fine-tuned: {label}-{secrets.token_hex(4)}"


class SessionModels:
    """Per-session fine-tuned models with a disk quota, a per-session cap and idle expiry.

    Thread-safe. Files are deleted outside the lock; a deleted model is also dropped from
    `explorer.models.MODEL_CACHE` (``on_delete``).

    Args:
        limits: fixed limits, or None to read `SessionLimits.from_env` at each use.
        on_delete: called with each model whose files were deleted.
        clock: seconds, for idle times (tests pass a fake one).
    """

    def __init__(self, limits: SessionLimits | None = None,
                 on_delete: Callable[[SessionModel], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._limits, self.on_delete, self.clock = limits, on_delete, clock
        self._models: dict[str, SessionModel] = {}  # name -> model, oldest first
        self._seen: dict[str, float] = {}  # session -> last activity
        self._lock = threading.Lock()
        self._sweeper: threading.Thread | None = None

    @property
    def limits(self) -> SessionLimits:
        return self._limits or SessionLimits.from_env()

    # -- what a session sees --------------------------------------------------------------

    def names(self, session: str) -> list[str]:
        """Picker names visible to ``session``: its own, or every session's when shared."""
        self.sweep()
        with self._lock:
            self._touch(session)
            shared = self.limits.shared
            return [m.name for m in self._models.values() if shared or m.session == session]

    def lookup(self, session: str, name: str) -> SessionModel | None:
        """The model called ``name`` if ``session`` may load it, else None."""
        with self._lock:
            self._touch(session)
            model = self._models.get(name)
            if model is None or not (model.session == session or self.limits.shared):
                return None
            return model

    # -- adding and deleting -------------------------------------------------------------

    def add(self, session: str, name: str, checkpoint: Path, files=()) -> SessionModel:
        """Register a session's new model, then evict to stay within the cap and the quota.

        The newest model is never evicted by its own arrival, even when it alone exceeds
        the quota (the person has just trained it; older ones go instead).
        """
        checkpoint = Path(checkpoint)
        files = tuple(dict.fromkeys((checkpoint, *map(Path, files))))
        model = SessionModel(name, session, checkpoint, files, nbytes=disk_bytes(files))
        limits = self.limits
        with self._lock:
            self._touch(session, adding=True)
            self._models[name] = model
            own = [m for m in self._models.values() if m.session == session]
            gone = own[: max(0, len(own) - limits.per_session)]
            for m in gone:
                del self._models[m.name]
            total = sum(m.nbytes for m in self._models.values())
            for m in list(self._models.values()):
                if total <= limits.quota_bytes or m is model:
                    break
                del self._models[m.name]
                total -= m.nbytes
                gone.append(m)
        self._delete(gone)
        self._start_sweeper()
        return model

    def end(self, session: str) -> list[str]:
        """The session is over (tab closed): delete its models. Returns their names."""
        with self._lock:
            self._seen.pop(session, None)
            gone = [m for m in self._models.values() if m.session == session]
            for m in gone:
                del self._models[m.name]
        self._delete(gone)
        return [m.name for m in gone]

    def sweep(self) -> list[str]:
        """Delete the models of sessions idle longer than ``idle_s``. Returns their names."""
        cutoff = self.clock() - self.limits.idle_s
        with self._lock:
            idle = {s for s, t in self._seen.items() if t < cutoff}
            for s in idle:
                del self._seen[s]
            gone = [m for m in self._models.values() if m.session in idle]
            for m in gone:
                del self._models[m.name]
        self._delete(gone)
        return [m.name for m in gone]

    def total_bytes(self) -> int:
        with self._lock:
            return sum(m.nbytes for m in self._models.values())

    def touch(self, session: str) -> None:
        """Note activity of ``session`` (its idle time starts again)."""
        with self._lock:
            self._touch(session)

    def _touch(self, session: str, adding: bool = False) -> None:
        # Only sessions that own models are tracked: the map stays as small as the registry.
        if adding or session in self._seen:
            self._seen[session] = self.clock()

    def _delete(self, gone: list[SessionModel]) -> None:
        for m in gone:
            for path in m.files:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            if self.on_delete is not None:
                self.on_delete(m)

    def _start_sweeper(self) -> None:
        """A daemon thread sweeps idle sessions even when no request comes (first add on)."""
        with self._lock:
            if self._sweeper is not None:
                return
            self._sweeper = threading.Thread(target=self._sweep_forever, daemon=True,
                                             name="vit-explorer-session-sweeper")
        self._sweeper.start()

    def _sweep_forever(self) -> None:
        while True:
            time.sleep(min(5.0, max(0.2, self.limits.idle_s / 4)))  # a dict scan: cheap
            self.sweep()


def _forget_loaded(model: SessionModel) -> None:
    models.evict_cached(model.load_name)


FINETUNES = SessionModels(on_delete=_forget_loaded)


def resolve_web_name(name: str | None, session: str, registry: SessionModels = FINETUNES) -> str:
    """The name `explorer.models.load_vit` should load for a name that came from the web.

    Args:
        name: what the picker sent (None or "" = the default model).
        session: the visitor's session id.
        registry: the fine-tunes registry.

    Returns:
        A catalogue, operator or hub name as it is, or a session model's internal name.

    Raises:
        ModelUnavailableError: a path, ``local:``, another session's model or a name that is
            no hub id; the message names no path.
    """
    name = (name or "").strip() or models.DEFAULT_MODEL
    registry.touch(session)  # any analysis counts as activity, whichever model it uses
    if name in models.CATALOGUE or name in models.local_model_names():
        return name
    own = registry.lookup(session, name)
    if own is not None:
        return own.load_name
    if name.startswith("fine-tuned: "):
        raise ModelUnavailableError(
            "This fine-tuned model is not available in this session (fine-tunes are private "
            "to the browser session that trained them, and deleted when it ends).")
    if name.startswith("local:") or not is_hub_id(name):
        raise ModelUnavailableError(REFUSED)
    found = models.hub_weights(name)  # None: no hub weights (a bad name fails when loaded)
    if found is not None and not models.hub_weights_cached(name):
        check_hub_download(name, found[0], found[2])
    return name


def hub_limit_mb() -> float:
    """The largest hub download a web visitor may start, in MB (``VIT_EXPLORER_MAX_HUB_MB``,
    default 400: a ViT-B/16 is ~350 MB, a ViT-L ~1.2 GB)."""
    return float(os.environ.get("VIT_EXPLORER_MAX_HUB_MB", "400"))


def check_hub_download(name: str, repo: str, weights) -> None:
    """Refuse a hub model typed on the web that this server should not fetch: typed hub names
    switched off by the operator (``VIT_EXPLORER_WEB_HUB=0``), or weights larger than
    `hub_limit_mb`. Asked with HEAD requests before anything downloads; when the hub cannot be
    reached, the loader's own offline message follows instead.

    Raises:
        ModelUnavailableError: naming the model and the limit, never a path.
    """
    if os.environ.get("VIT_EXPLORER_WEB_HUB", "1").lower() in ("0", "false", "no", "off"):
        raise ModelUnavailableError(
            f"This server only offers the models in its list; '{name}' is not one of them.")
    if not hub.reachable():
        return
    try:
        size = hub.file_bytes(repo, weights)
    except Exception:  # noqa: BLE001 (the loader reports hub errors with its own message)
        return
    limit = hub_limit_mb()
    if size is not None and size > limit * 1e6:
        raise ModelUnavailableError(
            f"'{name}' is a {size / 1e6:,.0f} MB download; this server fetches hub models up to "
            f"{limit:g} MB. Pick a smaller model or one from the list.")


def web_model_names(session: str, registry: SessionModels = FINETUNES) -> list[str]:
    """Every name a picker shows this session: catalogue, operator models, its fine-tunes."""
    return models.model_names() + registry.names(session)


def resolve_igpt_web_name(name: str | None, catalogue, default: str) -> str:
    """`resolve_web_name` for the iGPT picker: a catalogue name or a hub repo ``owner/name``.

    transformers reads ``owner/name`` from disk when such a folder exists (relative to the
    working directory), so a repo id that is also an existing path is refused too.

    Raises:
        ModelUnavailableError: anything else; the message names no path.
    """
    name = (name or "").strip() or default
    if name in catalogue:
        return name
    if is_hub_id(name, repo_only=True) and not os.path.lexists(name):
        weights = ("model.safetensors", "pytorch_model.bin")
        if not any(hub.cached(name, w) for w in weights):
            check_hub_download(name, name, weights)
        return name
    raise ModelUnavailableError(
        "iGPT models typed here are catalogue names or hub repos ('openai/imagegpt-small'); "
        "file paths are not accepted from the web.")
