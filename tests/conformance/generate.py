"""Write the decoder conformance vectors of the current bitstream version (run once per version).

    python tests/conformance/generate.py

Each vector is a chunk payload as stored in archives (``NAME.bin``) and, in ``vectors.json``,
the SHA-256 of the payload and of the frames it must decode to (the Y, U and V planes' bytes in
that order, ``Frames.tobytes()``). A version's folder is written once and kept for good: a later
bitstream version adds its own folder, and the old ones then test that old payloads still decode
or are refused with a clear error (tests/test_conformance.py). An independent decoder can test
itself against the same files.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
DEMO = HERE.parents[1] / "palstream" / "data" / "demo.mkv"

# name -> (source clip, frames, EncoderConfig arguments): intra and inter, lossless and lossy,
# odd sizes, small and large leaves, screen (palettes) and camera (residual) content, both coding orders
# and both half-pel filters.
VECTORS = {
    "camera_64x48_lossless": (DATA / "camera_64x48.mkv", 5, {"lossless": True}),
    "camera_64x48_psnr40": (DATA / "camera_64x48.mkv", 5, {"target_psnr": 40.0}),
    "camera_64x48_psnr30_max16": (DATA / "camera_64x48.mkv", 5, {"target_psnr": 30.0, "max_block": 16}),
    "screen_37x29_lossless": (DATA / "screen_37x29.mkv", 6, {"lossless": True}),
    "screen_37x29_psnr45": (DATA / "screen_37x29.mkv", 6, {"target_psnr": 45.0}),
    "mandel_48x32_psnr50": (DATA / "batch_mandel_48x32.mkv", 8, {"target_psnr": 50.0}),
    # bitstream 7: the encoder codes these frames as a pyramid (past and future references): the
    # fractal at 35 dB until bitstream 8, at 42 dB on bitstreams 9-10 (the INTRA transform moved the
    # choice); since bitstream 11 (whose offsets moved it again) 3-D animation, with quarter-pels and the sharp filter
    "anim3d_64x48_psnr40_pyramid": (DATA / "anim3d_64x48.mkv", 6, {"target_psnr": 40.0, "pyramid": True}),
    # bitstream 8: the encoder predicts this clip's half-pel motion with the sharp filter; since
    # bitstream 10 with quarter-pel vectors too; every lossy vector since bitstream 11 with sample offsets
    "anim3d_64x48_psnr40_sharp": (DATA / "anim3d_64x48.mkv", 6, {"target_psnr": 40.0}),
    "demo_640x360_psnr45": (DEMO, 4, {"target_psnr": 45.0}),
    "single_frame_37x29_psnr35": (DATA / "screen_37x29.mkv", 1, {"target_psnr": 35.0}),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main() -> int:
    from palstream.codec import EncoderConfig, decode_chunk, encode_chunk
    from palstream.codec.chunk import VERSION
    from palstream.io import read_frames

    folder = HERE / f"bitstream-{VERSION}"
    if folder.exists():
        print(f"{folder} exists: conformance vectors are kept for good; bump the bitstream version instead")
        return 1
    folder.mkdir()
    index = {"bitstream_version": VERSION, "vectors": {}}
    for name, (clip, count, settings) in VECTORS.items():
        frames = read_frames(str(clip), 0, count)
        payload = encode_chunk(frames, EncoderConfig(**settings)).payload
        decoded = decode_chunk(payload)
        (folder / f"{name}.bin").write_bytes(payload)
        index["vectors"][name] = {
            "source": f"{clip.name} frames 0..{count - 1}",
            "config": settings,
            "payload_sha256": sha256(payload),
            "frames": len(decoded),
            "height": decoded.height,
            "width": decoded.width,
            "decoded_sha256": sha256(decoded.tobytes()),
        }
        print(f"{name}: {len(payload)} bytes")
    (folder / "vectors.json").write_text(json.dumps(index, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
