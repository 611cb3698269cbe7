"""The palstream codec: chunk (GOP) encoder and bit-exact decoder.

Library API (the CLI and the batch system use only this):

- ``EncoderConfig``: frozen, validated settings.
- ``encode_chunk(frames, config, generator=None) -> EncodedChunk``: one GOP to opaque bytes.
- ``decode_chunk(payload) -> Frames``: bytes back to frames; numpy only, no torch.
- ``ModeStats``: the share of area and bits by leaf mode, filled by either (``modes=``).
- ``compile_kernels()``: compile the numba kernels ahead of use (``python -m palstream.codec``).
"""

from palstream.codec import precompile as _precompile

# before any kernel is defined: numba picks each kernel's cache folder at its definition
_precompile.use_writable_cache()
_precompile.announce_compiles()

from palstream.codec.chunk import EncodedChunk, encode_chunk  # noqa: E402
from palstream.codec.config import DEFAULT_TARGET_PSNR, EncoderConfig  # noqa: E402
from palstream.codec.decoder import BitstreamError, decode_chunk  # noqa: E402
from palstream.codec.modes import ModeStats  # noqa: E402
from palstream.codec.precompile import compile_kernels  # noqa: E402

_precompile.stamp_kernels_with_every_source()

__all__ = [
    "DEFAULT_TARGET_PSNR", "BitstreamError", "EncodedChunk", "EncoderConfig", "ModeStats", "compile_kernels",
    "decode_chunk", "encode_chunk",
]
