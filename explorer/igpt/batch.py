"""One decode loop for everyone: iGPT completions from any session share a running batch.

A lecture hall asks for many completions at once, each a handful of samples of its own
image. Run separately, each would push its few rows through every weight matrix on every
step, and the loops would fight for the cores. Here each model has one loop: a thread per
core (a lane), each running one decode step at a time for all rows of its share of the
running requests (continuous batching):

- a request (one image's known pixels, n samples, its own settings and seed) is prefilled
  in the caller's thread, its known pixels once for all its samples (as `SharedPrefixKV`),
  and joins the running batch at the next step;
- each step picks every request's next pixel with its own settings and random generator,
  exactly the calls `sampler.complete_stream` makes for it alone, so its samples do not
  depend on who else is in the batch (with the compiled step, bit for bit: each row's
  arithmetic is independent of the others', see `explorer/kernels/decode.cpp`);
- finished requests leave; a cancelled one (its consumer closed the stream, as when a tab
  closes) leaves at the next step and its rows' memory goes with it;
- each request streams its own snapshots (every `every` pixels and at the end).

The step is `KernelStep` (the compiled kernel: fp32 on the CPU, quick-GELU models) where it
can run, else `TorchStep` (the model's own PyTorch modules: any device, the int8 decoder).
No gradio here; `pipeline.stream_completions` is the tab's way in.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from explorer import kernels, settings
from explorer.igpt.model import Conv1D, GroupedKV, ImageGPT
from explorer.igpt.sampler import SampleConfig, pick_next
from explorer.igpt.sequence import with_start


class Completion:
    """One request in the running batch: n samples of one image, filled in place.

    Made by `DecodeLoop.prepare`; iterate it for (pixels filled, (n, L) tokens snapshot).
    """

    def __init__(self, model: ImageGPT, prefix: torch.Tensor, n: int, length: int,
                 cfg: SampleConfig, every: int = 1):
        self.model, self.cfg, self.n, self.length, self.every = model, cfg, n, length, every
        self.out = prefix.new_zeros(n, length)
        self.out[:, :prefix.shape[0]] = prefix
        self.t = prefix.shape[0]  # the next pixel to pick; its input is pixel t - 1 at position t
        self.gen = None
        if cfg.seed is not None and not cfg.greedy:
            self.gen = torch.Generator(device=prefix.device).manual_seed(int(cfg.seed))
        self.cache = None  # keys/values in the step's own layout, set by `DecodeLoop.prepare`
        self.cancelled = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def done(self) -> bool:
        return self.t >= self.length

    def advance(self, logits: torch.Tensor) -> None:
        """Pick pixel t of every sample from its (n, V) logits, with this request's settings
        and generator; hand the consumer a snapshot every `every` pixels and at the end."""
        self.out[:, self.t] = pick_next(logits, self.cfg, self.gen)
        self.t += 1
        if self.t % self.every == 0 or self.done:
            self._queue.put((self.t, self.out.to("cpu", copy=True)))  # a CPU snapshot
        if self.done:
            self.cache = None

    def fail(self, err: BaseException) -> None:
        """Hand `err` to the consumer; the loop drops the request."""
        self.cancelled = True
        self._queue.put(err)

    def cancel(self) -> None:
        """Leave the batch at the next step: the loop drops this request and its rows' memory
        (only the loop thread touches `cache`, so a step in flight is never disturbed)."""
        self.cancelled = True

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Yields (pixels filled, (n, L) tokens on the CPU) until the last pixel; closing it
        (or dropping it) cancels the request."""
        try:
            while True:
                item = self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item[0] >= self.length:
                    return
        finally:
            self.cancel()


class TorchStep:
    """A step through the model's own modules (`ImageGPT.decode_rows`): any device and
    dtype. Weight matrices run once for all rows, attention group by group."""

    def new_cache(self, model: ImageGPT, prefill: list, n: int, length: int) -> list:
        if model.kv_dtype is None:
            return model.shared_prefix_cache(prefill, n, length)
        caches = model.new_cache(n, length)  # a reduced-precision cache: one copy per row
        for (k, v), (pk, pv) in zip(caches, prefill, strict=True):
            k[:, :, :pk.shape[2]] = pk
            v[:, :, :pv.shape[2]] = pv
        return caches

    def __call__(self, tokens: torch.Tensor, group: list[Completion]) -> torch.Tensor:
        model = group[0].model
        layers = model.config.n_layer
        caches = [GroupedKV([(c.cache[i], c.t) for c in group]) for i in range(layers)]
        positions = torch.cat([torch.full((c.n,), c.t, device=tokens.device) for c in group])
        return model.decode_rows(tokens, positions, caches)


def pack(w: torch.Tensor) -> torch.Tensor:
    """A (K, N) weight matrix as `decode.cpp` reads it: column tiles of 64 (then of 16), each
    tile's K rows contiguous, so a tile streams from memory in one sequential run."""
    w = w.detach()
    tiles, n0 = [], 0
    while n0 < w.shape[1]:
        width = 64 if w.shape[1] - n0 >= 64 else 16
        tiles.append(w[:, n0:n0 + width].reshape(-1))
        n0 += width
    return torch.cat(tiles)


class KernelStep:
    """A step through the compiled kernel (`explorer.kernels.decode_op`): fp32 CPU models
    with OpenAI's quick-GELU and widths that are multiples of 16 (`supports`). Holds its
    own packed copy of the weight matrices (`pack`), the size of the model's."""

    def __init__(self, model: ImageGPT, op):
        self.op = op
        cfg = model.config
        tr = model.transformer
        head = model.lm_head.weight.detach()  # (V, C)
        padded = -(-cfg.n_colors // 16) * 16
        head_t = head.new_zeros(cfg.n_embd, padded)
        head_t[:, :cfg.n_colors] = head.t()
        self.weights = [tr.wte.weight.detach(), tr.wpe.weight.detach(),
                        tr.ln_f.weight.detach(), pack(head_t)]
        for b in tr.h:
            self.weights += [
                b.ln_1.weight.detach(), pack(b.attn.c_attn.weight), b.attn.c_attn.bias.detach(),
                pack(b.attn.c_proj.weight), b.attn.c_proj.bias.detach(), b.ln_2.weight.detach(),
                pack(b.mlp.c_fc.weight), b.mlp.c_fc.bias.detach(), pack(b.mlp.c_proj.weight),
                b.mlp.c_proj.bias.detach()]
        self.n_head, self.eps, self.n_out = cfg.n_head, cfg.layer_norm_epsilon, cfg.n_colors

    # Bigger models (OpenAI's iGPT-M and -L) take the PyTorch step: the packed copy would
    # double their gigabytes of weights.
    max_params = 100_000_000

    @classmethod
    def supports(cls, model: ImageGPT) -> bool:
        p = model.transformer.wte.weight
        c = model.config
        return (p.device.type == "cpu" and p.dtype == torch.float32 and model.kv_dtype is None
                and model.num_params() <= cls.max_params
                and c.activation_function == "quick_gelu" and c.n_embd % 16 == 0
                and (c.n_inner or 4 * c.n_embd) % 16 == 0
                and all(type(m) is Conv1D for b in model.transformer.h
                        for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)))

    def new_cache(self, model: ImageGPT, prefill: list, n: int, length: int):
        """The layouts `decode.cpp` reads: the prefix's keys (L, nh, ceil(P/16), hs, 16) and
        values (L, nh, P, hs); the rows' own keys (L, n, nh, ceil(T/16), hs, 16) and values
        (L, n, nh, T, hs), T = length - P. Keys go in blocks of 16 positions, each block
        (hs, 16): one query's scores for 16 keys are hs multiply-adds of one vector."""
        v_pre = torch.stack([v[0] for _, v in prefill])  # (L, nh, P, hs)
        layers, nh, P, hs = v_pre.shape
        k_pre = torch.stack([k[0] for k, _ in prefill])
        k_pre = F.pad(k_pre, (0, 0, 0, -P % 16)).unflatten(2, (-1, 16)).transpose(-1, -2)
        T = length - P
        k_own = v_pre.new_zeros(layers, n, nh, -(-T // 16), hs, 16)
        v_own = v_pre.new_zeros(layers, n, nh, T, hs)
        return k_pre.contiguous(), v_pre, k_own, v_own

    def __call__(self, tokens: torch.Tensor, group: list[Completion]) -> torch.Tensor:
        k_pre, v_pre, k_own, v_own = zip(*(c.cache for c in group), strict=True)
        return self.op(tokens, self.weights, k_pre, v_pre, k_own, v_own, [c.n for c in group],
                       [c.t for c in group], self.n_head, self.eps, self.n_out)


def step_for(model: ImageGPT) -> KernelStep | TorchStep:
    """The compiled step where it can run (and builds), else the PyTorch one."""
    if KernelStep.supports(model):
        op = kernels.decode_op()
        if op is not None:
            return KernelStep(model, op)
    return TorchStep()


@torch.inference_mode()
def prefill(model: ImageGPT, prefix: torch.Tensor) -> tuple[list, torch.Tensor]:
    """The start token and the known pixels (P,) in one batch-1 pass -> (one (k, v) pair per
    layer, each (1, nh, P + 1, hs); the (1, V) logits for pixel P)."""
    cache = model.new_cache(1, prefix.shape[0] + 1)
    logits = model(with_start(prefix[None], model.config.start_token), cache, pos=0)[:, -1]
    return cache, logits


class _Lane:
    """One thread stepping its share of the running requests (see `DecodeLoop`)."""

    def __init__(self):
        self.pending: list[Completion] = []
        self.thread: threading.Thread | None = None
        self.rows = 0  # rows running or waiting to join


class DecodeLoop:
    """The running batch of one model, stepped by `lanes` threads while it has rows.

    Each lane is one thread with its own share of the requests (a new request joins the lane
    with the fewest rows) and runs its steps on `threads` cores (default one). A step mostly
    waits on memory, so a second core nearly halves it; lanes get that from a second core
    without the OpenMP barriers a multi-threaded step needs ~20 times a step, which spin and
    stall whenever the machine's other work takes a core (BENCHMARKS.md "iGPT decode loop").
    A request stays in its lane, so its samples never depend on the lanes either.
    """

    def __init__(self, model: ImageGPT, step=None, lanes: int | None = None, threads: int = 1):
        self.step = step or step_for(model)
        self.threads = threads
        self._lanes = [_Lane() for _ in range(lanes or os.cpu_count() or 1)]
        self._lock = threading.Lock()

    @property
    def rows(self) -> int:
        """Rows running or waiting to join, over all lanes (read by tests and benchmarks)."""
        return sum(lane.rows for lane in self._lanes)

    def prepare(self, model: ImageGPT, prefix: torch.Tensor, n: int, length: int,
                cfg: SampleConfig, every: int = 1) -> Completion:
        """A request ready to join: prefilled (in the caller's thread) and its first pixel
        picked. `submit` joins it to the running batch.

        Args:
            prefix: (P,) known pixel tokens in raster order (no start token); P may be 0.
            n: samples of this image. length: total pixels L, P < L <= n_positions.
            every: hand the consumer a snapshot every this many filled pixels (and the last).
        """
        prefix = prefix.to(model.transformer.wte.weight.device)
        P = prefix.shape[0]
        if not 0 <= P < length <= model.config.n_positions or n < 1:
            raise ValueError(f"need 0 <= prefix ({P}) < length ({length}) <= n_positions "
                             "and at least one sample")
        request = Completion(model, prefix, n, length, cfg, every)
        with torch.inference_mode():
            kv, logits = prefill(model, prefix)
            request.cache = self.step.new_cache(model, kv, n, length)
            request.advance(logits.expand(n, -1))  # as `complete_stream` picks pixel P
        return request

    def submit(self, model: ImageGPT, prefix: torch.Tensor, n: int, length: int,
               cfg: SampleConfig, every: int = 1) -> Completion:
        """`prepare` a request and join it to the running batch at the next step (the loop's
        thread starts if it was idle). Iterate the returned `Completion` for its rows."""
        request = self.prepare(model, prefix, n, length, cfg, every)
        if not request.done:
            with self._lock:
                lane = min(self._lanes, key=lambda la: la.rows)
                lane.pending.append(request)
                lane.rows += n
                if lane.thread is None:
                    # not a daemon: at exit Python waits for the running rows (a daemon
                    # thread stopped inside a native step can abort the process)
                    lane.thread = threading.Thread(target=self._run, args=(lane,),
                                                   name="igpt-decode-lane")
                    lane.thread.start()
        return request

    @torch.inference_mode()
    def step_all(self, active: list[Completion]) -> list[Completion]:
        """One step for every row of `active` (none cancelled): each request picks its next
        pixel with its own settings. Returns the requests not yet finished."""
        tokens = torch.cat([c.out[:, c.t - 1] for c in active])
        logits = self.step(tokens, active)
        row = 0
        for c in active:
            if not c.cancelled:  # cancelled while the step ran: nobody listens
                try:
                    c.advance(logits[row:row + c.n])
                except Exception as err:  # this request's settings, not the batch's
                    c.fail(err)
            row += c.n
        return [c for c in active if not c.done]

    def _run(self, lane: _Lane) -> None:
        active: list[Completion] = []
        torch.set_num_threads(self.threads)  # this thread's own setting (OpenMP's is per thread)
        try:
            while True:
                with self._lock:
                    for c in lane.pending + active:
                        if c.cancelled:
                            c.cache = None
                    active = [c for c in active + lane.pending if not c.cancelled]
                    lane.pending.clear()
                    lane.rows = sum(c.n for c in active)
                    if not active:
                        lane.thread = None
                        return
                active = self.step_all(active)
        except BaseException as err:  # hand the error to every waiting consumer
            with self._lock:
                failed = active + lane.pending
                lane.pending.clear()
                lane.thread = None
                lane.rows = 0
            for c in failed:
                c.cache = None
                c.fail(err)


_loops: weakref.WeakKeyDictionary[ImageGPT, DecodeLoop] = weakref.WeakKeyDictionary()
_loops_lock = threading.Lock()


def loop_for(model: ImageGPT) -> DecodeLoop:
    """The model's one decode loop (made on first use, with the settings' lanes; it goes when
    the model does)."""
    with _loops_lock:
        loop = _loops.get(model)
        if loop is None:
            loop = _loops[model] = DecodeLoop(model, lanes=settings.current().decode_lanes)
        return loop


def stream(model: ImageGPT, prefix: torch.Tensor, n: int, length: int,
           cfg: SampleConfig | None = None, every: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
    """Complete `n` samples of one image in the model's shared decode loop.

    prefix: (P,) known pixel tokens. Yields (pixels filled, (n, L) tokens) every `every`
    pixels and at the end; the samples equal `sampler.complete_stream`'s for the same
    settings and seed. Closing the generator cancels the request.
    """
    yield from loop_for(model).submit(model, prefix, n, length, cfg or SampleConfig(), every)
