"""A check that an analysis stays on its model's device, runnable on a CPU-only machine.

Put the model and its input on the ``meta`` device (shapes, no data) and run the analysis
inside `StaysOnDevice`: a dispatch mode that sees every aten op and records any op whose
tensors sit on more than one device (a CPU tensor created inside the analysis and mixed with
the model's), and any copy off the device (``.cpu()`` before the numpy boundary). Mixing
must be caught here because meta kernels do not check devices themselves (``cpu @ meta``
and ``einsum`` pass silently). Scalar reads (``float(t)``, ``t.item()``) are allowed and
answer 0.0, so analyses that read a number or two still run to the end.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_aten = torch.ops.aten
_TRANSFERS = {_aten._to_copy.default, _aten.copy_.default, _aten.to.device, _aten.to.dtype_layout}


class StaysOnDevice(TorchDispatchMode):
    """Records device mixing and departures from ``device`` during the ops run inside it.

    Attributes:
        problems: one line per offending op: its name and the devices it touched.
    """

    def __init__(self, device: str | torch.device = "meta"):
        super().__init__()
        self.device = torch.device(device)
        self.problems: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten._local_scalar_dense.default:
            return 0.0  # a scalar read: fine for the check, meta has no value to give
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        # 0-dim CPU tensors are scalars that PyTorch lets any device use.
        real = [t for t in inputs if not (t.device.type == "cpu" and t.dim() == 0)]
        devices = {t.device for t in real}
        if func in _TRANSFERS:
            leaving = self._departure(func, args, kwargs)
            if leaving is not None:
                return leaving
        elif len(devices) > 1 or (devices and self.device not in devices):
            self.problems.append(f"{func}: tensors on {sorted(str(d) for d in devices)}")
        out = func(*args, **kwargs)
        if not inputs:
            made = {str(t.device) for t in tree_flatten(out)[0]
                    if isinstance(t, torch.Tensor) and t.device != self.device and t.dim()}
            if made:
                self.problems.append(f"{func}: created on {sorted(made)}")
        return out

    def _departure(self, func, args, kwargs):
        """For a copy off the device: record it and return a stand-in (meta has no data)."""
        if func is _aten.copy_.default:
            dst, src = args[0], args[1]
            if src.device == self.device and dst.device != self.device:
                self.problems.append(f"{func}: copied off {self.device} -> {dst.device}")
                return dst
            return None
        src = args[0]
        target = kwargs.get("device") or (args[1] if func is _aten.to.device else None)
        if src.device == self.device and target is not None and torch.device(target) != self.device:
            self.problems.append(f"{func}: copied off {self.device} -> {target}")
            return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype, device=target)
        return None


def assert_stays_on_device(fn, *args, device="meta", **kwargs):
    """Run ``fn(*args, **kwargs)`` under `StaysOnDevice`; fail listing the offending ops."""
    with StaysOnDevice(device) as guard:
        result = fn(*args, **kwargs)
    assert not guard.problems, "left the model's device:\n" + "\n".join(guard.problems[:10])
    return result
