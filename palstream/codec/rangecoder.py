"""Adaptive binary range coder (integer-exact, numba-compiled).

Why not ``constriction``: its coders take whole arrays of symbols with probabilities known in
advance. Our context model needs each symbol's neighbours *as decoded*, so the coder has to
sit inside the compiled per-pixel loop, which a Python-level library call cannot do at video
rates. The coder is the LZMA range coder (carry handled with a cache byte) with two-speed
probability estimates; every operation is on int64, so all machines produce the same bytes.

State layout (``st``, int64[8]): low, range, cache, cache_size, position, code, overrun, unused.
Probabilities (``probs``, int32[n, 2]): P(bit = 0) in 1/32768 units, fast and slow estimate.
"""

import math

import numpy as np
from numba import njit

PROB_BITS = 15
PROB_ONE = 1 << PROB_BITS
TOP = 1 << 24
LOW, RANGE, CACHE, CACHE_SIZE, POS, CODE, OVERRUN = 0, 1, 2, 3, 4, 5, 6
MAX_OVERRUN = 16  # bytes read past the end before a stream is declared truncated


def new_probs(n: int) -> np.ndarray:
    return np.full((n, 2), PROB_ONE // 2, dtype=np.int32)


def new_state() -> np.ndarray:
    st = np.zeros(8, dtype=np.int64)
    st[RANGE] = 0xFFFFFFFF
    st[CACHE_SIZE] = 1
    return st


@njit(cache=True, nogil=True, inline="always")
def _shift_low(st, buf):
    low = st[LOW]
    if low < 0xFF000000 or low >= (1 << 32):
        carry = low >> 32
        temp = st[CACHE]
        while True:
            if st[POS] < buf.shape[0]:
                buf[st[POS]] = (temp + carry) & 0xFF
            st[POS] += 1  # past the end: counted, caller grows the buffer and retries
            temp = 0xFF
            st[CACHE_SIZE] -= 1
            if st[CACHE_SIZE] == 0:
                break
        st[CACHE] = (low >> 24) & 0xFF
    st[CACHE_SIZE] += 1
    st[LOW] = (low & 0x00FFFFFF) << 8


@njit(cache=True, nogil=True, inline="always")
def _next_byte(st, buf):
    pos = st[POS]
    st[POS] = pos + 1
    if pos < buf.shape[0]:
        return np.int64(buf[pos])
    st[OVERRUN] += 1
    return np.int64(0)


@njit(cache=True, nogil=True)
def flush(st, buf):
    for _ in range(5):
        _shift_low(st, buf)
    return st[POS]


@njit(cache=True, nogil=True, inline="always")
def bits_consumed(enc, st):
    """Information coded so far, in bits, up to a constant: the bytes shifted out of (encoder) or
    into (decoder) the coder, less what the range still holds. Both directions shift a byte at the
    same symbols (their ranges are equal), so differences agree between them exactly."""
    shifted = st[POS] + st[CACHE_SIZE] if enc else st[POS]  # encoder: bytes written and the ones pending
    return 8.0 * shifted - math.log2(st[RANGE])


@njit(cache=True, nogil=True)
def start_decoding(st, buf):
    st[RANGE] = 0xFFFFFFFF
    st[CODE] = 0
    st[POS] = 0
    st[OVERRUN] = 0
    for _ in range(5):
        st[CODE] = ((st[CODE] << 8) | _next_byte(st, buf)) & 0xFFFFFFFF


@njit(cache=True, nogil=True, inline="always")
def _normalise(enc, st, buf):
    """Keep the range above 2^24 by shifting out (encoder) or in (decoder) a byte at a time."""
    while st[RANGE] < TOP:
        st[RANGE] <<= 8
        if enc:
            _shift_low(st, buf)
        else:
            st[CODE] = ((st[CODE] << 8) | _next_byte(st, buf)) & 0xFFFFFFFF


@njit(cache=True, nogil=True, inline="always")
def code_bit(enc, st, buf, probs, ctx, bit):
    """Encode ``bit`` (enc) or decode and return a bit (not enc) under context ``ctx``."""
    pf = np.int64(probs[ctx, 0])
    ps = np.int64(probs[ctx, 1])
    bound = (st[RANGE] >> PROB_BITS) * ((pf + ps) >> 1)
    if enc:
        if bit == 0:
            st[RANGE] = bound
        else:
            st[LOW] += bound
            st[RANGE] -= bound
    else:
        if st[CODE] < bound:
            st[RANGE] = bound
            bit = 0
        else:
            st[CODE] -= bound
            st[RANGE] -= bound
            bit = 1
    if bit == 0:
        probs[ctx, 0] = pf + ((PROB_ONE - pf) >> 4)
        probs[ctx, 1] = ps + ((PROB_ONE - ps) >> 7)
    else:
        probs[ctx, 0] = pf - (pf >> 4)
        probs[ctx, 1] = ps - (ps >> 7)
    _normalise(enc, st, buf)
    return bit


@njit(cache=True, nogil=True, inline="always")
def code_bypass(enc, st, buf, bit):
    """An equiprobable bit, no context."""
    st[RANGE] >>= 1
    if enc:
        if bit:
            st[LOW] += st[RANGE]
    else:
        if st[CODE] >= st[RANGE]:
            st[CODE] -= st[RANGE]
            bit = 1
        else:
            bit = 0
    _normalise(enc, st, buf)
    return bit


@njit(cache=True, nogil=True)
def code_tree(enc, st, buf, probs, base, nbits, value):
    """``nbits``-bit value, MSB first, each bit in the context of the bits above it.

    Uses contexts ``base + 1 .. base + 2**nbits - 1``.
    """
    node = 1
    for i in range(nbits - 1, -1, -1):
        b = code_bit(enc, st, buf, probs, base + node, (value >> i) & 1)
        node = 2 * node + b
    return node - (1 << nbits)


@njit(cache=True, nogil=True, inline="always")
def code_ueg(enc, st, buf, probs, base, value):
    """Unsigned value (< 2**20) as adaptive exponent then adaptive mantissa bits.

    Exponent e = bit length of value (0 for value 0), unary with contexts ``base + 0..20``;
    mantissa bit j of exponent e in context ``base + 21 + 20 * e + j``: 21 + 20*21 = 441 contexts.
    """
    e = 0
    if enc:
        v = value
        while v > 0:
            e += 1
            v >>= 1
        for i in range(e):
            code_bit(enc, st, buf, probs, base + i, 1)
        if e < 20:
            code_bit(enc, st, buf, probs, base + e, 0)
    else:
        while e < 20 and code_bit(enc, st, buf, probs, base + e, 0) == 1:
            e += 1
    if e == 0:
        return 0
    out = 1
    for j in range(e - 2, -1, -1):
        out = (out << 1) | code_bit(enc, st, buf, probs, base + 21 + 20 * e + j, (value >> j) & 1)
    return out


UEG_CONTEXTS = 21 + 20 * 21
