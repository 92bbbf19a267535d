"""One browser session's context, without gradio: who it is, what it keeps, what it runs.

The UI turns gradio's request into a `SessionContext` (`explorer.ui.common.session`); every
tab asks it, and only it, for:

- the session id: gradio's ``session_hash``, or `LOCAL` for a call that comes with no
  browser session (Python, tests);
- the models it may load (`resolve`: catalogue, operator, hub and its own fine-tunes);
- results kept between its events, found by what they are: ``ctx.keep(analysis, inputs)``
  keeps a value under its type and ``ctx.peek(AttentionAnalysis, inputs)`` finds one made
  from those inputs. They live in the byte-bounded `explorer.store.STORE` shared by all
  sessions; the session holds only the `Ref`;
- a cancel flag per kind of job (fine-tune, lab run) while the job runs (`job`), which the
  tab's stop button sets (`stop`);
- its models (`save_model`): a checkpoint under a random folder, registered with
  `explorer.sessions.FINETUNES`, which deletes it with the session.

`end` (the browser tab was closed) deletes its models, forgets its kept results and stops its
running jobs.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from explorer import sessions
from explorer.finetune.checkpoint import finetuned_dir, zip_checkpoint
from explorer.store import STORE, Ref

T = TypeVar("T")

LOCAL = "local"  # the session of calls without a browser session (Python, tests)
DOWNLOAD_PREFIX = "vit-explorer-ckpt-"  # + a random token: another session cannot guess it

_jobs: dict[tuple[str, str], threading.Event] = {}  # (session, kind of job) -> cancel flag
_jobs_lock = threading.Lock()


class ModelSaveError(Exception):
    """A session model could not be saved; ``str(err)`` is a message for people."""


@dataclass(frozen=True)
class SavedModel:
    """A model saved for a session: its picker name, checkpoint and download (if any)."""

    name: str
    checkpoint: Path
    download: Path | None


def models_dir() -> Path:
    """Where session models are saved, one random folder each."""
    return finetuned_dir() / "sessions"


def _kind(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class SessionContext:
    """One browser session: see the module docstring.

    Attributes:
        id: gradio's ``session_hash``, or `LOCAL`.
    """

    id: str

    # -- models ---------------------------------------------------------------------------

    def resolve(self, model_name: str | None) -> str:
        """The name `explorer.models.load_vit` loads for a name from the web; paths and
        ``local:`` are refused (`explorer.sessions.resolve_web_name`).

        Raises:
            ModelUnavailableError: with a message that names no path.
        """
        return sessions.resolve_web_name(model_name, self.id)

    def model_names(self) -> list[str]:
        """What this session's pickers list: catalogue, operator models, its fine-tunes."""
        return sessions.web_model_names(self.id)

    # -- kept results ---------------------------------------------------------------------

    def keep(self, value: object, inputs: Hashable) -> Ref:
        """Keep ``value`` (made from ``inputs``) as this session's one result of its type."""
        return STORE.keep((self.id, _kind(type(value))), inputs, value)

    def kept(self, ref: Ref, rebuild: Callable[[Hashable], T]) -> T:
        """The value ``ref`` points to, or ``rebuild(ref.inputs)`` once it was dropped."""
        return STORE.get_or_rebuild(ref, rebuild)

    def peek(self, cls: type[T], inputs: Hashable) -> T | None:
        """This session's kept ``cls`` if it was made from these very ``inputs``, else None."""
        return STORE.peek((self.id, _kind(cls)), inputs)

    # -- jobs -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def job(self, kind: str) -> Iterator[threading.Event]:
        """A cancel flag for this session's running ``kind`` of job, set by `stop` (and on
        the way out, so an engine whose client went away stops too)."""
        key, cancel = (self.id, kind), threading.Event()
        with _jobs_lock:
            _jobs[key] = cancel
        try:
            yield cancel
        finally:
            cancel.set()
            with _jobs_lock:
                if _jobs.get(key) is cancel:
                    del _jobs[key]

    def stop(self, kind: str) -> bool:
        """Ask this session's running ``kind`` of job to stop; False if none runs."""
        with _jobs_lock:
            cancel = _jobs.get((self.id, kind))
        if cancel is None or cancel.is_set():
            return False
        cancel.set()
        return True

    # -- saving models --------------------------------------------------------------------

    def save_model(self, label: str, write: Callable[[Path], Path],
                   downloads: Path | None = None) -> SavedModel:
        """Save a model this session made and add it to the session's pickers.

        Args:
            label: what the run was; the picker name adds a random ending to it.
            write: writes the checkpoint into the folder it is given (timm's layout) and
                returns that folder.
            downloads: also zip the checkpoint into a random folder under this one (the
                UI's served folder: its random name is the only way to its URL).

        Raises:
            ModelSaveError: the disk refused (the message names no path); nothing is left
                behind.
        """
        made = [models_dir() / secrets.token_hex(8)]
        try:
            checkpoint = write(made[0] / label)
            download = None
            if downloads is not None:
                made.append(downloads / (DOWNLOAD_PREFIX + secrets.token_urlsafe(16)))
                made[-1].mkdir(parents=True)
                download = made[-1] / f"{label}.zip"
                shutil.move(zip_checkpoint(checkpoint), download)
        except OSError as err:  # a full disk, permissions
            for folder in made:
                shutil.rmtree(folder, ignore_errors=True)
            raise ModelSaveError(
                f"Could not save the model ({err.strerror or type(err).__name__}).") from err
        name = sessions.unguessable_name(label)
        sessions.FINETUNES.add(self.id, name, checkpoint, files=made)
        return SavedModel(name, checkpoint, download)

    # -- the end --------------------------------------------------------------------------

    def end(self) -> None:
        """The session is over: its models' files go, its kept results and its jobs stop."""
        sessions.FINETUNES.end(self.id)
        STORE.drop(lambda key: isinstance(key, tuple) and key[0] == self.id)
        with _jobs_lock:
            running = [e for (session, _), e in _jobs.items() if session == self.id]
        for cancel in running:
            cancel.set()


def context(session_id: str | None) -> SessionContext:
    """The context of the session ``session_id`` (None: `LOCAL`)."""
    return SessionContext(session_id or LOCAL)
