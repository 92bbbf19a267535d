"""Run one benchmark: `python -m explorer.bench NAME [args...]`.

Each benchmark is a module `explorer.bench.NAME` with a `main(argv: list[str]) -> None`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import explorer.bench as bench_pkg


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if not m.name.startswith("_"))


def main() -> None:
    names = available()
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        print(f"usage: python -m explorer.bench {{{'|'.join(names)}}} [args...]")
        sys.exit(2)
    importlib.import_module(f"explorer.bench.{sys.argv[1]}").main(sys.argv[2:])


if __name__ == "__main__":
    main()
