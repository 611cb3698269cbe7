"""Compile-ahead: a notice whenever the codec compiles, a read-only cache that still works, and
compile_kernels covering every kernel signature the codec uses."""

import ctypes
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from palstream.codec.precompile import AHEAD_NOTICE, FIRST_USE_NOTICE

DATA = Path(__file__).parent / "data"
DEMO = Path(__file__).parents[1] / "palstream" / "data" / "demo.mkv"
# one small kernel: compiles in about a second
FLUSH = "import numpy as np; from palstream.codec import rangecoder; rangecoder.flush(rangecoder.new_state(), np.zeros(16, np.uint8))"


def _python(code: str, cache: Path, tmp: Path, read_only: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` with ``cache`` as numba's cache folder; ``read_only``: as root too, folders
    without write permission stay unwritable."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "TMPDIR": str(tmp)}
    drop = _without_root_overrides if read_only and os.geteuid() == 0 else None
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp, preexec_fn=drop
    )


def test_a_cold_cache_says_it_compiles_and_a_warm_one_is_silent(tmp_path):
    cache = tmp_path / "cache"
    cold = _python(FLUSH, cache, tmp_path)
    assert cold.returncode == 0, cold.stderr
    assert cold.stderr.splitlines() == [FIRST_USE_NOTICE]
    warm = _python(FLUSH, cache, tmp_path)
    assert warm.returncode == 0 and warm.stderr == ""


def test_a_change_to_any_codec_source_recompiles_every_kernel(tmp_path):
    """The range coder's kernel compiles again after a change to syntax.py alone: a compiled kernel
    holds the code of the kernels it calls from other files, which numba's own stamp (the
    kernel's file) would miss. Runs a copy of the package, so that its sources can change."""
    copy = tmp_path / "src"
    shutil.copytree(Path(__file__).parents[1] / "palstream", copy / "palstream", ignore=shutil.ignore_patterns("__pycache__"))
    code = f"import sys; sys.path.insert(0, {str(copy)!r}); " + FLUSH
    cache = tmp_path / "cache"
    assert _python(code, cache, tmp_path).stderr.splitlines() == [FIRST_USE_NOTICE]
    assert _python(code, cache, tmp_path).stderr == ""
    with open(copy / "palstream" / "codec" / "syntax.py", "a") as source:
        source.write("# changed\n")
    assert _python(code, cache, tmp_path).stderr.splitlines() == [FIRST_USE_NOTICE]


def _without_root_overrides() -> None:
    """Drop the capabilities that let root write into read-only folders (Linux ``prctl``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_a_read_only_cache_is_copied_and_used_with_one_warning(tmp_path):
    baked = tmp_path / "baked"
    assert _python(FLUSH, baked, tmp_path).returncode == 0  # the image build's compile
    for path in [baked, *baked.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    # flush comes from the copy (no notice before the mark); start_decoding, not in it, compiles into it
    code = (
        FLUSH + "; import sys; print('mark', file=sys.stderr); rangecoder.start_decoding(rangecoder.new_state(), "
        "np.zeros(16, np.uint8)); from numba.core import config; print(config.CACHE_DIR)"
    )
    first = _python(code, baked, tmp_path, read_only=True)
    assert first.returncode == 0, first.stderr
    warning, mark, notice = first.stderr.splitlines()
    assert warning.startswith(f"warning: numba cache {baked} is read-only; using a copy in ")
    assert (mark, notice) == ("mark", FIRST_USE_NOTICE)
    copy = Path(first.stdout.strip())
    assert copy.is_relative_to(tmp_path) and list(copy.rglob("rangecoder.start_decoding-*.nbi"))
    again = _python(code, baked, tmp_path, read_only=True)
    assert again.returncode == 0 and again.stderr == "mark\n" and again.stdout == first.stdout  # copied once


COVERAGE = """
import sys
import numpy as np
from numba.core.registry import CPUDispatcher
from palstream.codec import EncoderConfig, compile_kernels, decode_chunk, encode_chunk
from palstream.codec import analysis, rangecoder, syntax
from palstream.io import read_frames
from palstream.learned import chroma

compile_kernels()
kernels = [f for m in (analysis, rangecoder, syntax, chroma) for f in vars(m).values() if isinstance(f, CPUDispatcher)]
before = {k: set(k.signatures) for k in kernels}
# the shipped demo has blocks the palette generators get to propose for (cgan-v1's own kernels)
for path, n in ((sys.argv[1] + "/camera_64x48.mkv", 6), (sys.argv[1] + "/screen_37x29.mkv", 4), (sys.argv[2], 2)):
    frames = read_frames(path, 0, n)
    for config in (EncoderConfig(lossless=True), EncoderConfig(target_psnr=38.0), EncoderConfig(palette="cgan-v1")):
        decode_chunk(encode_chunk(frames, config).payload)
new = [f"{k.py_func.__module__}.{k.__name__}{s}" for k in kernels for s in set(k.signatures) - before[k]]
print("\\n".join(new))
"""


def test_compile_kernels_covers_every_signature_the_codec_uses(tmp_path):
    """In a fresh process, encoding and decoding real clips after compile_kernels() needs no kernel
    signature that compile_kernels() did not already compile or load."""
    run = subprocess.run(
        [sys.executable, "-c", COVERAGE, str(DATA), str(DEMO)], capture_output=True, text=True, timeout=1800,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""


def test_compile_ahead_says_so_at_once(tmp_path):
    """With a cold cache, ``python -m palstream.codec`` names what it is doing before it compiles
    for minutes (stopped here after that first line)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    start = time.perf_counter()
    ahead = subprocess.Popen([sys.executable, "-m", "palstream.codec"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        first = ahead.stderr.readline().rstrip("\n")
        noticed = time.perf_counter() - start
    finally:
        ahead.kill()
        ahead.communicate()
    assert first == AHEAD_NOTICE
    assert noticed < 10  # about 0.5 s on an idle 2-core machine; a loaded one takes longer to start Python


def test_a_cold_encode_says_so_first_before_its_set_up(tmp_path):
    """With an empty cache the notice comes before torch is imported and the source read (seconds
    of set-up); the process is stopped there, before minutes of compiling. Python's import-time
    log on the same stderr shows the order."""
    env = {
        **os.environ,
        "NUMBA_CACHE_DIR": str(tmp_path / "cache"),
        "TMPDIR": str(tmp_path),
        "PYTHONPROFILEIMPORTTIME": "1",
    }
    cli = "import sys; sys.argv = ['palstream', *sys.argv[1:]]; from palstream.cli import main; main()"
    process = subprocess.Popen(
        [sys.executable, "-c", cli, "encode", str(DEMO), str(tmp_path / "a.zarr")], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        before = []
        for line in process.stderr:
            if line.rstrip("\n") == FIRST_USE_NOTICE:
                break
            before.append(line)
        else:
            raise AssertionError("no compile notice: " + "".join(before[-5:]))
        imported = {line.rsplit("|", 1)[-1].strip() for line in before if line.startswith("import time:")}
        assert "palstream.codec" in imported and "torch" not in imported
    finally:
        process.kill()
        process.wait()
