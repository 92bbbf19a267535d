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

No gradio here: a session id is gradio's ``session_hash`` (`explorer.session_context`). The
limits (`SessionLimits`) are the operator's settings (`explorer.settings.Settings`: quota,
fine-tunes per session, idle time, sharing, hub downloads), set by the app at start.
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
from explorer.settings import Settings

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
    """What web sessions may use: disk and lifetime of fine-tunes, and hub downloads.

    Attributes:
        quota_bytes: disk for all sessions' fine-tunes together (oldest evicted first).
        per_session: fine-tunes a session keeps (its oldest evicted first).
        idle_s: a session idle this long loses its fine-tunes.
        shared: every session sees every fine-tune (a lecture's presenter shares theirs).
        hub_mb: the largest hub download a name typed on the web may start.
        web_hub: whether names typed on the web may name hub models at all.
    """

    quota_bytes: int
    per_session: int
    idle_s: float
    shared: bool
    hub_mb: float
    web_hub: bool

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> SessionLimits:
        """The operator's limits (default: the settings' defaults)."""
        settings = settings or Settings()
        return cls(quota_bytes=int(settings.finetune_quota_mb * 2**20),
                   per_session=max(1, settings.finetunes_per_session),
                   idle_s=settings.session_idle_s, shared=settings.share_finetunes,
                   hub_mb=settings.max_hub_mb, web_hub=settings.web_hub)


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
        limits: the bounds; ``limits`` may be replaced later (the app sets the operator's).
        on_delete: called with each model whose files were deleted.
        clock: seconds, for idle times (tests pass a fake one).
    """

    def __init__(self, limits: SessionLimits | None = None,
                 on_delete: Callable[[SessionModel], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.limits = limits or SessionLimits.from_settings()
        self.on_delete, self.clock = on_delete, clock
        self._models: dict[str, SessionModel] = {}  # name -> model, oldest first
        self._seen: dict[str, float] = {}  # session -> last activity
        self._lock = threading.Lock()
        self._sweeper: threading.Thread | None = None

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


FINETUNES = SessionModels(on_delete=_forget_loaded)  # the app sets the operator's limits


def resolve_web_name(name: str | None, session: str, registry: SessionModels = FINETUNES) -> str:
    """The name `explorer.models.load_vit` should load for a name that came from the web.

    Args:
        name: what the picker sent (None or "" = the default model).
        session: the visitor's session id.
        registry: the fine-tunes registry (and the limits of what the web may use).

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
        check_hub_download(name, found[0], found[2], registry.limits)
    return name


def check_hub_download(name: str, repo: str, weights, limits: SessionLimits) -> None:
    """Refuse a hub model typed on the web that this server should not fetch: typed hub names
    switched off by the operator (``limits.web_hub``), or weights larger than
    ``limits.hub_mb``. Asked with HEAD requests before anything downloads; when the hub cannot
    be reached, the loader's own offline message follows instead.

    Raises:
        ModelUnavailableError: naming the model and the limit, never a path.
    """
    if not limits.web_hub:
        raise ModelUnavailableError(
            f"This server only offers the models in its list; '{name}' is not one of them.")
    if not hub.reachable():
        return
    try:
        size = hub.file_bytes(repo, weights)
    except Exception:  # noqa: BLE001 (the loader reports hub errors with its own message)
        return
    limit = limits.hub_mb
    if size is not None and size > limit * 1e6:
        raise ModelUnavailableError(
            f"'{name}' is a {size / 1e6:,.0f} MB download; this server fetches hub models up to "
            f"{limit:g} MB. Pick a smaller model or one from the list.")


def web_model_names(session: str, registry: SessionModels = FINETUNES) -> list[str]:
    """Every name a picker shows this session: catalogue, operator models, its fine-tunes."""
    return models.model_names() + registry.names(session)


def resolve_igpt_web_name(name: str | None, catalogue, default: str,
                          registry: SessionModels = FINETUNES) -> str:
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
            check_hub_download(name, name, weights, registry.limits)
        return name
    raise ModelUnavailableError(
        "iGPT models typed here are catalogue names or hub repos ('openai/imagegpt-small'); "
        "file paths are not accepted from the web.")
