"""The palstream codec: chunk (GOP) encoder and bit-exact decoder.

Library API (the CLI and the batch system use only this):

- ``EncoderConfig``: frozen, validated settings.
- ``encode_chunk(frames, config, generator=None) -> EncodedChunk``: one GOP to opaque bytes.
- ``decode_chunk(payload) -> Frames``: bytes back to frames; numpy only, no torch.
"""

from palstream.codec.config import DEFAULT_TARGET_PSNR, EncoderConfig
from palstream.codec.chunk import BitstreamError, EncodedChunk, decode_chunk, encode_chunk

__all__ = ["DEFAULT_TARGET_PSNR", "BitstreamError", "EncodedChunk", "EncoderConfig", "decode_chunk", "encode_chunk"]
