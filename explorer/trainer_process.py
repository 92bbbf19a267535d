"""A training generator run in a child process of its own, its events relayed to the app.

Why: the app's process keeps its heap small for a room of requests (`explorer.tuning`: glibc's
arenas capped, freed memory handed back every 0.25 s), and a training step allocates and frees
the same tens of MB every step, so in the app's process each step faults every page in again.
A child keeps what it frees (`tuning.keep_freed_memory`, as every grid worker does), so the
tab's live run trains faster (BENCHMARKS.md, "Session 21"); what the run allocates goes away
with the child, whatever the server's heap policy; and a run the system kills (out of memory)
ends in a message rather than taking the server with it.

The child is a fresh interpreter (``python -c``, this module's `_child_main`): it imports only
what the run needs (a few seconds: torch and timm), holds no memory once the run ends, and
never runs the app's script again (`multiprocessing`'s spawn would import ``app.py`` and gradio
in every child; its fork server would hold their memory between runs). It runs with the app's
settings, torch threads and module path. Messages cross as length-prefixed pickles: the job on
the child's stdin, then one stop byte when the caller's ``cancel`` is set (or the end of file
when the app goes away); the events on the child's stdout (the child's own prints go to its
stderr, the app's log). Tensors cross as bytes: nothing is shared in memory that either side
could change or free under the other; events cross as CPU values (`explorer.gpu.to_cpu`). A
cancelled run stops at its next step and ends as it would in the app's process
(`explorer.training.TrainLoop`): what it yields as it stops still comes. An exception raised in
the child is raised again in the app with its message (`explorer.gpu.crossing_error`).
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

POLL_S = 0.1  # how often the relay looks at the caller's cancel while the child computes
JOIN_S = 10.0  # how long a closed stream waits for its child to stop at a step, then kills it
STOP = b"s"  # the one byte the app sends to stop a run at its next step
_DONE, _EVENT, _ERROR = "done", "event", "error"
_LOG = logging.getLogger(__name__)
_HEADER = struct.Struct("<Q")  # a message's length
_ROOT = str(Path(__file__).resolve().parents[1])  # the folder that holds `explorer`
_LAUNCH = ("import sys; sys.path.insert(0, sys.argv[1]); "
           "from explorer.trainer_process import _child_main; _child_main()")


class TrainerDied(RuntimeError):
    """The child ended without finishing its run (killed: most often out of memory)."""


def write_message(out: BinaryIO, value) -> None:
    data = pickle.dumps(value)
    out.write(_HEADER.pack(len(data)) + data)
    out.flush()


def read_message(inp: BinaryIO):
    """The next message on ``inp``; EOFError at its end (or inside a cut-off message)."""
    size, = _HEADER.unpack(_read_exactly(inp, _HEADER.size))
    return pickle.loads(_read_exactly(inp, size))


def _read_exactly(inp: BinaryIO, size: int) -> bytes:
    """``size`` bytes (an unbuffered pipe may return fewer per read); EOFError before them."""
    parts, left = [], size
    while left:
        part = inp.read(left)
        if not part:
            raise EOFError
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def stream_training(gen_fn: Callable[..., Iterator], *args, cancel: threading.Event,
                    seconds: float, **kwargs) -> Iterator:
    """A training run where it trains best: on a machine without CUDA (and with the
    settings' ``train_in_child`` on) in a child process of its own (`stream`); elsewhere where
    `explorer.gpu.stream_on_device` puts it (a ZeroGPU worker, the GPU, the app's process).
    On a GPU the step's memory is the device's, which its caching allocator keeps anyway.

    For a run whose state lives only in its events (the lab's live run). Not the fine-tune:
    its linear mode keeps the features it computes in the app's process for the next run
    (`explorer.finetune.probe.FEATURE_CACHE`), and its step, dominated by large matrix
    products, gains nothing from the kept heap (BENCHMARKS.md, "Session 21").

    Args:
        seconds: the ZeroGPU duration to ask for (`explorer.gpu.training_seconds`).
    """
    import torch

    from explorer import gpu, settings

    if (not gpu.on_zero_gpu() and settings.current().train_in_child
            and not torch.cuda.is_available()):
        return stream(gen_fn, *args, cancel=cancel, **kwargs)
    return gpu.stream_on_device(gen_fn, *args, cancel=cancel, seconds=seconds, **kwargs)


def stream(gen_fn: Callable[..., Iterator], *args, cancel: threading.Event, **kwargs
           ) -> Iterator:
    """``gen_fn(*args, cancel=<the child's event>, **kwargs)``, run in a child process; yields
    its events as they come. Closing the stream early (a visitor who leaves) stops the child
    at its next step, and kills it if it has not stopped within `JOIN_S`.

    Args:
        gen_fn: a module-level generator function (its name crosses to the child) taking a
            ``cancel`` event.
        cancel: set it to stop the run at its next step; what the run yields as it stops
            still comes.

    Raises:
        TrainerDied: the child ended without a last word (killed by the system).
        Exception: whatever the run raised, with its message.
    """
    import torch

    from explorer import settings

    job = (gen_fn, args, kwargs, settings.current(), torch.get_num_threads())
    child = subprocess.Popen([sys.executable, "-c", _LAUNCH, _ROOT], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    messages: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_all, args=(child.stdout, messages),
                              name="trainer-reader", daemon=True)
    reader.start()
    stopped = finished = False
    try:
        try:
            write_message(child.stdin, sys.path)
            write_message(child.stdin, job)
        except OSError:  # the child has gone already: the end of its output says how
            pass
        while True:
            if cancel.is_set() and not stopped:
                _send_stop(child)
                stopped = True
            try:
                kind, value = messages.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if kind == _EVENT:
                yield value
            elif kind == _ERROR:
                finished = True
                raise value
            elif kind == _DONE:
                finished = True
                return
            else:  # the end of the child's output without a last word
                child.wait()
                # the visitor gets a message (`explorer.ui.common.user_errors`), the log this
                _LOG.warning("trainer process for %s ended with code %s without finishing",
                             getattr(gen_fn, "__name__", gen_fn), child.returncode)
                raise TrainerDied(
                    "The training stopped unexpectedly (its process ended with code "
                    f"{child.returncode}; most often the machine ran out of memory). Try "
                    "fewer images.")
    finally:
        if not finished and not stopped:
            _send_stop(child)
        try:
            child.stdin.close()
        except OSError:  # the child has gone: its end of the pipe is closed
            pass
        try:
            child.wait(JOIN_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        reader.join()
        child.stdout.close()


def _send_stop(child: subprocess.Popen) -> None:
    try:
        child.stdin.write(STOP)
        child.stdin.flush()
    except OSError:  # the child has gone already
        pass


def _read_all(inp: BinaryIO, messages: queue.Queue) -> None:
    """The reader thread: every message from the child, then ``(None, None)`` at the end."""
    try:
        while True:
            messages.put(read_message(inp))
    except (EOFError, OSError):
        messages.put((None, None))


def _child_main() -> None:
    """The child's side: the app's settings, threads and path, the grid workers' heap policy,
    then the run, each event sent as it comes, then a last word (done, or the error)."""
    # the events go out on a private copy of stdout; whatever the run prints goes to stderr
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # stdin unbuffered: a buffered reader could take the stop byte in with the job, and the
    # stop thread, blocked in a buffered read, would hold its lock at interpreter shutdown
    inp = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)  # noqa: SIM115
    from explorer import gpu

    try:
        # the app's module path first, so that the job's function and values can be found
        sys.path[:] = read_message(inp)
        gen_fn, args, kwargs, app_settings, threads = read_message(inp)
        import torch

        from explorer import settings, tuning

        settings.install(app_settings)
        torch.set_num_threads(threads)
        tuning.keep_freed_memory()
        cancel = threading.Event()
        threading.Thread(target=_wait_for_stop, args=(inp, cancel), daemon=True).start()
        for event in gen_fn(*args, cancel=cancel, **kwargs):
            write_message(out, (_EVENT, gpu.to_cpu(event)))
        write_message(out, (_DONE, None))
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the app
        write_message(out, (_ERROR, gpu.crossing_error(err, "the training process")))
    finally:
        out.close()


def _wait_for_stop(inp: BinaryIO, cancel: threading.Event) -> None:
    """Set ``cancel`` at the app's stop byte, or when the app closes the pipe (it has gone)."""
    inp.read(1)
    cancel.set()
