"""Shared by the kernel and attention tests: skip what needs the compiled kernel where no
C++ compiler exists (elsewhere the kernel must build: `test_native_kernel_builds_...`)."""

import pytest

from explorer import kernels

needs_compiler = pytest.mark.skipif(not kernels.compiler_available(),
                                    reason="no C++ compiler: the native kernel cannot build")
