"""Compile-ahead of the codec's numba kernels, and a notice whenever they compile.

numba compiles every kernel on first use and keeps the machine code in its on-disk cache
(``cache=True``): a cold cache costs minutes of CPU, a warm one a fraction of a second.
Three things keep that from surprising anyone:

- :func:`compile_kernels` compiles every kernel and signature the codec uses, once, ahead of
  time (after install, or while a container image is built);
- :func:`announce_compiles` prints one line on stderr as soon as numba starts compiling one of
  palstream's kernels (a cold or stale cache), terminal or not, and nothing when the cache is warm;
- :func:`use_writable_cache` copies a read-only ``NUMBA_CACHE_DIR`` (a cache baked into a
  read-only container image) to a writable folder, since numba cannot use a cache it cannot write.

``python -m palstream.codec`` runs :func:`compile_kernels`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from numba.core import config as numba_config
from numba.core import event
from numba.core.caching import FunctionCache
from numba.core.registry import CPUDispatcher as Dispatcher

# Cold `python -m palstream.codec` (65 kernels, one thread): 4.7 min of CPU measured on the
# project's 2-core machines, which is the wall time where the machine is otherwise idle.
COMPILE_MINUTES = 5
FIRST_USE_NOTICE = (
    f"palstream: compiling the codec's kernels for this machine, once (about {COMPILE_MINUTES} min); "
    "later runs load them from numba's cache"
)
AHEAD_NOTICE = f"compiling palstream's codec kernels once (about {COMPILE_MINUTES} min)…"


class _CompileNotice(event.Listener):
    """Prints ``message`` on stderr when numba first compiles a palstream function in this process."""

    def __init__(self) -> None:
        self.message = FIRST_USE_NOTICE
        self.compiled = 0  # palstream functions numba compiled (not loaded from its cache)
        self.said = False
        self._lock = threading.Lock()  # Dask workers compile from several threads

    def on_start(self, ev: event.Event) -> None:
        if not getattr(ev.data["dispatcher"].py_func, "__module__", "").startswith("palstream."):
            return
        with self._lock:
            self.compiled += 1
            self._say()

    def _say(self) -> None:
        if not self.said:
            self.said = True
            print(self.message, file=sys.stderr, flush=True)

    def early(self, modules) -> None:
        """Say it now if numba's cache holds no kernel of ``modules`` at all (a stat each).

        A cold encode first imports torch and reads the whole source (seconds) before its first
        kernel compiles; this makes the notice the first thing it prints. Only an empty cache
        counts: kernels that are only ever inlined into others never get an entry of their own. A
        stale cache (kernels whose source changed) is announced by :meth:`on_start`, when they
        recompile.
        """
        try:
            cached = any(
                os.path.exists(kernel._cache._cache_file._index_path)  # numba's index file (internal)
                for module in modules
                for kernel in vars(module).values()
                if isinstance(kernel, Dispatcher) and isinstance(kernel._cache, FunctionCache)
            )
        except AttributeError:  # another numba layout: on_start still announces the compile
            return
        if not cached:
            with self._lock:
                self._say()

    def on_end(self, ev: event.Event) -> None:
        pass


_notice = _CompileNotice()
_registered = False


def _kernel_modules() -> tuple:
    from palstream.codec import analysis, prefilter, rangecoder, sao, syntax

    return analysis, prefilter, rangecoder, sao, syntax


def announce_if_cold() -> None:
    """Print the first-use notice now if the codec's kernels are not in numba's cache: for the
    long paths (encode, decode), before their seconds of set-up."""
    _notice.early(_kernel_modules())


def stamp_kernels_with_every_source() -> None:
    """Make every codec kernel's cache entry stale when any codec source changes, not only its own.

    numba stamps a kernel's cache entry with a hash of the kernel's own file, but a compiled kernel
    holds the code of the kernels it calls from other files (``analysis.decide`` the syntax's
    prediction, the syntax the range coder's): after a change to ``syntax.py`` alone, the cached
    analysis would go on pricing the old prediction, and after one to ``rangecoder.py`` alone the
    cached frame syntax would code with the old coder. Each kernel's stamp becomes one hash of
    all five files (numba's cache file's ``_source_stamp``, internal: checked against the entry
    when loading, written with it when saving). Call once the kernels are defined, before any runs.
    """
    modules = _kernel_modules()
    digest = hashlib.sha256(b"".join(Path(module.__file__).read_bytes() for module in modules)).digest()
    for module in modules:
        for kernel in vars(module).values():
            if isinstance(kernel, Dispatcher) and isinstance(kernel._cache, FunctionCache):
                cache_file = getattr(kernel._cache, "_cache_file", None)
                if cache_file is None or not hasattr(cache_file, "_source_stamp"):
                    return  # another numba layout: its own per-file stamps stay
                cache_file._source_stamp = digest


def announce_compiles() -> None:
    """Print one line on stderr when numba starts compiling palstream's kernels (idempotent).

    numba fires its ``numba:compile`` event only on a cache miss, so this costs nothing while
    the cache is warm and needs no terminal.
    """
    global _registered
    if not _registered:
        event.register("numba:compile", _notice)
        _registered = True


def _writable(path: str) -> bool:
    """Whether numba can keep its cache in ``path``: the same test numba makes."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def use_writable_cache() -> None:
    """Give numba a writable cache folder when ``NUMBA_CACHE_DIR`` names a read-only one.

    numba uses a cache only where it can write (otherwise it falls back to other folders, or
    fails). A read-only ``NUMBA_CACHE_DIR`` is copied once per user to
    ``<tmp>/palstream-numba-<uid>/<hash of its path>`` (a warning line says so) and numba is
    pointed at the copy. Call before any of palstream's kernels is defined: numba picks a
    kernel's cache folder when the kernel is defined.
    """
    source = numba_config.CACHE_DIR
    if not source or _writable(source):
        return
    digest = hashlib.sha256(os.path.abspath(source).encode()).hexdigest()[:12]
    parent = os.path.join(tempfile.gettempdir(), f"palstream-numba-{os.getuid()}")
    target = os.path.join(parent, digest)
    if not os.path.isdir(target):
        staging = None
        try:
            os.makedirs(parent, exist_ok=True)
            staging = tempfile.mkdtemp(dir=parent)
            # files only, not their modes: the copy of a read-only cache must be writable
            for folder, _, names in os.walk(source):
                into = os.path.join(staging, os.path.relpath(folder, source))
                os.makedirs(into, exist_ok=True)
                for name in names:
                    shutil.copyfile(os.path.join(folder, name), os.path.join(into, name))
            os.rename(staging, target)  # atomic: of processes copying at once, the first one wins
        except OSError:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            if not _writable(target):
                print(
                    f"warning: numba cache {source} is read-only and {parent} is not writable; "
                    "the codec compiles in every process (set NUMBA_CACHE_DIR to a writable folder)",
                    file=sys.stderr,
                )
                numba_config.CACHE_DIR = ""  # numba falls back to its own folders
                return
        print(f"warning: numba cache {source} is read-only; using a copy in {target}", file=sys.stderr)
    numba_config.CACHE_DIR = target


def _clip():
    """Four 64x48 frames that reach every kernel: flat areas (skip, exact palettes), a moving
    gradient (intra, inter with one and two references; from frame 3 on, a coded second-reference
    distance) and 16x16 blocks of many colours that still cluster (the palette generator's proposals)."""
    from palstream.frames import Frames

    rng = np.random.default_rng(0)
    t, h, w = 4, 48, 64
    yy, xx = np.mgrid[:h, :w]
    y = np.empty((t, h, w), np.uint8)
    for f in range(t):
        y[f] = (2 * (xx + 2 * f) + yy) % 256
    # top-left 16x16 block: 190 samples on 4 levels, 66 distinct others (> 64 colours, top 16 cover 75 %)
    block = np.repeat(np.array([40, 90, 150, 210], np.uint8), 64)[:256]
    block[190:] = np.arange(66, dtype=np.uint8) * 3 + 1
    y[:, :16, :16] = rng.permutation(block).reshape(16, 16)
    y[:, 32:, 48:] = 128  # flat
    u = np.full((t, h // 2, w // 2), 128, np.uint8)
    v = u.copy()
    u[:, :8, :8] = np.where(y[:, :16:2, :16:2] > 100, 60, 200)
    v[:, :8, :8] = y[:, :16:2, :16:2]
    return Frames(y, u, v)


def compile_kernels(palettes: tuple[str, ...] = ("kmeans", "cgan-v1")) -> int:
    """Compile every numba kernel the codec uses, for every signature it uses, into numba's cache.

    Encodes and decodes a tiny synthetic clip losslessly and lossily, with each palette
    generator in ``palettes`` (``cgan-v1`` has kernels of its own). With a cold cache the line
    ``compiling palstream's codec kernels once (about N min)…`` appears on stderr as soon as
    the first kernel starts compiling; with a warm one this prints nothing and takes seconds.

    Parameters
    ----------
    palettes : tuple of str
        Palette generators whose proposal path to compile.

    Returns
    -------
    int
        How many kernels numba compiled (0: the cache was warm).
    """
    from palstream.codec import prefilter
    from palstream.codec.chunk import encode_chunk
    from palstream.codec.config import EncoderConfig
    from palstream.codec.decoder import decode_chunk

    announce_compiles()
    _notice.message = AHEAD_NOTICE
    announce_if_cold()
    before = _notice.compiled
    start = time.perf_counter()
    try:
        clip = _clip()
        # lossless first (the in-codec ``dominant`` palettes), then each batched generator's proposals
        # (and the pyramid's coding order, chosen here for this clip's probe)
        configs = [EncoderConfig(lossless=True)] + [EncoderConfig(target_psnr=40.0, palette=p, pyramid=True) for p in palettes]
        for config in configs:
            decode_chunk(encode_chunk(clip, config).payload)
        # the synthetic clip is noiseless, so the encoder leaves it unfiltered: denoise a noisy copy
        rng = np.random.default_rng(0)
        noisy = tuple(np.clip(p + rng.normal(0, 2, p.shape), 0, 255).astype(np.uint8) for p in (clip.y, clip.u, clip.v))
        prefilter.denoise(noisy, clip.y.shape[1:], floor_mse=20.0)
    finally:
        _notice.message = FIRST_USE_NOTICE
    compiled = _notice.compiled - before
    if compiled:
        print(f"compiled {compiled} kernels in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return compiled
