"""``python -m palstream.codec``: compile the codec's kernels into numba's cache ahead of use."""

from palstream.codec.precompile import compile_kernels

compile_kernels()
