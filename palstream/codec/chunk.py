"""The chunk (GOP) encoder: palette proposals, rate control, and the header it writes.

The payload layout is specified in ``storage/BITSTREAM.md``; the decoder and the frame loop
that both directions run are in ``decoder.py``.
"""

from __future__ import annotations

import bisect
import functools
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from palstream.codec import analysis, prefilter, rangecoder, ratecontrol, syntax
from palstream.codec.config import EncoderConfig
from palstream.codec.decoder import (
    FLAG_INTRA_TRANSFORM,
    FLAG_LOSSLESS,
    FLAG_PYRAMID,
    FLAG_QUARTER,
    FLAG_SAO,
    FLAG_SHARP,
    HEADER,
    LEVEL_STEP,
    MAGIC,
    MAX_DIMENSION,
    MAX_FRAMES,
    NO_STATS,
    VERSION,
    code_frames,
    coding_order,
)
from palstream.codec.modes import ModeStats
from palstream.frames import Frames


@dataclass
class EncodedChunk:
    """One coded GOP: the opaque ``payload`` and what the encoder measured (``stats``)."""

    payload: bytes
    stats: dict = field(default_factory=dict)


def _pad(plane: np.ndarray, multiple: int) -> np.ndarray:
    t, h, w = plane.shape
    ph = -h % multiple
    pw = -w % multiple
    return np.pad(plane, ((0, 0), (0, ph), (0, pw)), mode="edge") if ph or pw else np.ascontiguousarray(plane)


def _psnr(mse: float) -> float:
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def initial_step(target_psnr: float) -> int:
    """Quantiser step whose uniform error (q^2 - 1)/12 just meets the target MSE."""
    mse = 255.0**2 / 10 ** (target_psnr / 10)
    return max(1, int(math.sqrt(12 * mse + 1)))


# bits are worth LAMBDA * step^2 squared error each: 0.7x the 0.375 tuned on 8 frames of corpus clips,
# near the fixed-rung optimum on 32 (docs/codec.md, "λ 0.7× (kept after bitstream 8)")
LAMBDA = 0.2625
ROUNDING = 0.3  # dead-zone rounding offset, in steps: levels lean toward zero, cheaper to code
INTRA_NOISE = 0.5  # the analysis prices intra prediction from neighbours noisy by +-INTRA_NOISE/2 step
PROPOSAL_SIZE = 8  # entries asked of the generator per block; the RD merges and drops them per leaf


def proposal_candidates(keys, entries: int, max_palette: int):
    """The blocks a batched generator is asked about: those with more distinct values than an
    exact palette may hold (``analysis.exact_limit``) or than ``entries``, where a palette of
    ``entries`` with escapes codes something an exact one does not.

    Parameters
    ----------
    keys : torch.Tensor
        int64 (N, P): the samples of N blocks, one a row, as keys (a luma level, or Cb * 256 + Cr).
    entries : int
        The palette size asked for.
    max_palette : int
        ``EncoderConfig.max_palette``.

    Returns
    -------
    torch.Tensor
        bool (N,): the candidates.
    """
    ordered = keys.sort(dim=1).values
    distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(1) + 1
    return distinct > min(entries, analysis.exact_limit(keys.shape[1], max_palette))


def _blocks(plane: np.ndarray, size: int) -> np.ndarray:
    """(t, h, w) -> (t * h/size * w/size, size * size): the frames' blocks in raster order, one a row."""
    t, h, w = plane.shape
    return plane.reshape(t, h // size, size, w // size, size).transpose(0, 1, 3, 2, 4).reshape(-1, size * size)


def _no_proposals(shape: tuple[int, ...], entries: int) -> tuple[np.ndarray, ...]:
    """Empty proposals for luma planes of ``shape`` (t, h, w): (luma keys, count, chroma keys,
    count) per block, rows as ``analysis.proposal_rows``."""
    t, h, w = shape
    rows = int(analysis.proposal_rows(h, w)[-1])
    return tuple(np.zeros((t, rows, entries), np.int64) if i % 2 == 0 else np.zeros((t, rows), np.int32) for i in range(4))


def _palette_proposals(luma, cb, cr, config: EncoderConfig, generator):
    """A batched generator's palettes for the chunk's blocks of every leaf size where one can
    compete (``proposal_candidates``), one call per size and component, with the blocks'
    features where the generator takes them (one ``block_features`` call for the chunk, so a CNN
    runs once per frame); a generator that returns no entries (``none``) proposes nothing, so
    only exact palettes are coded. The analysis codes a proposal with escapes for the samples no
    entry fits and merges or drops its entries by RD (``analysis._best_palette``). Every block is
    a lot to ask on a CPU: k-means takes seconds a frame, cgan-v1 about 130 ms at 640x360
    (docs/codec.md), hence ``dominant``, run in the analysis."""
    import torch  # encoder only: decoding must not need torch

    from palstream.palettes.kmeans import lloyd

    t, h, w = luma.shape
    entries = min(PROPOSAL_SIZE, config.max_palette)
    first = analysis.proposal_rows(h, w)
    proposals = _no_proposals(luma.shape, entries)

    asks = []  # (level, size, component, candidate rows, their uint8 samples (N, size * size, C))
    for lev, s in enumerate(analysis.PROPOSAL_SIZES):
        if config.min_block <= s <= config.max_block:
            for comp, planes, size in ((0, (luma,), s), (1, (cb, cr), s // 2)):
                samples = np.stack([_blocks(p, size) for p in planes], axis=-1)
                wide = samples.astype(np.int64)
                keys = torch.from_numpy(wide[..., 0] * 256 + wide[..., 1] if comp else wide[..., 0])
                pick = torch.nonzero(proposal_candidates(keys, entries, config.max_palette)).squeeze(1).numpy()
                if pick.size:
                    asks.append((lev, s, comp, pick, samples[pick]))
    if not asks:
        return proposals

    def boxes(s, pick):  # frame, top, left, size of candidate rows
        across = w // s
        frame, index = np.divmod(pick, (h // s) * across)
        return np.stack([frame, index // across * s, index % across * s, np.full_like(pick, s)], 1)

    features = generator.block_features(luma, cb, cr, np.concatenate([boxes(s, pick) for _, s, _, pick, _ in asks]))
    start = 0
    for lev, s, comp, pick, picked in asks:
        chosen = torch.from_numpy(picked.astype(np.float32))
        k = torch.full((pick.size,), entries, dtype=torch.int64)
        palettes = generator.generate(chosen, k, None if features is None else features[start:start + pick.size])
        start += pick.size
        if palettes.shape[1] == 0:
            return proposals
        if config.refine:
            palettes = lloyd(chosen.to(palettes.device), palettes, k.to(palettes.device), config.refine)
        levels = palettes[:, :entries].round().clamp(0, 255).to(torch.int64).cpu().numpy()
        found = levels[..., 0] * 256 + levels[..., 1] if comp else levels[..., 0]
        per_frame = (h // s) * (w // s)
        frame, row = pick // per_frame, first[lev] + pick % per_frame
        proposals[2 * comp][frame, row] = np.sort(found, axis=1)
        proposals[2 * comp + 1][frame, row] = entries
    return proposals


@functools.lru_cache(maxsize=4)
def _generator(name: str):
    """One generator per name and process: learned ones load their weights once."""
    from palstream.palettes import create_palette_generator  # torch: encoder only

    return create_palette_generator(name)


def _rd_lambda(q4: int, config: EncoderConfig) -> float:
    """The nominal RD lambda at step ``q4`` (quarter levels): what a bit is worth in squared error."""
    return 0.0 if config.lossless else LAMBDA * (q4 / 4) ** 2 * config.lambda_scale


def _encode_at(padded, rung, config: EncoderConfig, proposals, dominant: bool, order, motion, interp: int,
               control: ratecontrol.LambdaControl | None = None, stats=NO_STATS):
    """Code the frames of ``padded`` at one rung, in ``order`` (``decoder.coding_order``), with the
    palette generator's ``proposals``, or its palettes of ``dominant`` values; ``motion``: the
    motion field and second-reference distances (``analysis.motion_search_chunk``); ``interp``: the
    motion interpolation (``syntax.Coding.interp``); ``control``
    scales the RD lambda frame by frame; ``stats``: leaf statistics to fill
    (``palstream.codec.modes``), or ``NO_STATS``."""
    q4, rounding = rung
    dweight = 1e6 if config.lossless else 1.0
    field, distances = motion

    def decide(f, src, ref, ref2, ref2_scale, coding, decisions, probs, predictors):
        fq4 = coding.q4
        rd_lambda = max(_rd_lambda(fq4, config), 1.0) * (control.scale(f, recon[0]) if control else 1.0)
        table = analysis.residual_cost_table(fq4, coding.rounding[0], rd_lambda, dweight)
        noise = 0 if config.lossless else round(fq4 * INTRA_NOISE)
        pricing = analysis.Pricing(
            table, rd_lambda, dweight, noise, config.min_block, config.max_block, config.max_palette, fq4 if fq4 > 4 else 0,
            fq4, coding.esc_tol, dominant, interp,
        )
        analysis.decide(src, ref, ref2, f > 0, ref2_scale, field[f], pricing, tuple(p[f] for p in proposals),
                        analysis.palette_coder(probs, predictors, src, f == 0), decisions)
        return rd_lambda

    recon = tuple(np.zeros_like(p) for p in padded)
    capacity = padded[0].size * 3 + 4096
    esc_tol = int(_rd_lambda(q4, config) * analysis.ESCAPE_BITS)  # 0 when lossless: every inexact sample escapes, exactly
    coding = syntax.Coding(q4, rounding, config.min_block, config.max_block, q4 > 4, True, esc_tol, interp, q4 > 4, q4 > 4, True)
    while True:
        buf = np.zeros(capacity, np.uint8)
        stats[...] = 0  # a retry into a larger buffer codes every leaf again
        st = code_frames(True, buf, padded, recon, coding, order, decide, stats=stats, distances=distances)
        size = rangecoder.flush(st, buf)
        if size <= capacity:
            return bytes(buf[:size]), recon
        capacity = size + 4096  # rare: incompressible content; code again into a larger buffer


def _searches(order) -> np.ndarray:
    """``analysis.motion_search_chunk``'s rows for the frames of ``order``: group by group of four,
    the nearest references first, so that each search has the one before's vectors, scaled, as
    candidates (an anchor four frames on from those of its group's frames one and two away)."""
    steps = sorted(order, key=lambda s: (-(-s.f // 4), abs(s.f - s.ref)))
    return np.array([(s.f, s.ref, s.ref2, s.scale) for s in steps], np.int64).reshape(-1, 4)


def _quality_ladder() -> list[tuple[int, tuple[int, ...]]]:
    """(step, rounding offsets) in quarter levels, from lossless (step 1) to coarsest; offset j
    applies where j of the left, top, top-left and top-right levels are non-zero.

    Quarter-level steps give the rate control rungs about 0.3 dB apart, except where the
    smallest coded error ``ceil((q4 - rnd4) / 4)`` grows by one: there the PSNR falls off a cliff
    (3 dB on film grain when errors of 2 stop being coded). Four rungs before each such step code
    the smaller error only next to at least 1, 2, 3 or 4 non-zero levels, where it is cheapest.
    """

    def smallest_coded(q4):
        return -(-(q4 - int(q4 * ROUNDING)) // 4)

    rungs = []
    for q4 in range(4, 256):
        rnd4 = int(q4 * ROUNDING)
        smallest = smallest_coded(q4)
        if q4 > 4 and smallest > smallest_coded(q4 - 1):
            busy = q4 - 4 * (smallest - 1)  # rounds the smaller error up to a level
            rungs += [(q4, (rnd4,) * j + (busy,) * (5 - j)) for j in range(1, 5)]
        rungs.append((q4, (rnd4,) * 5))
    return rungs


LADDER = _quality_ladder()
# step of each rung for the rate control's model of MSE against step: cliff rungs in fifths of a quarter
STEPS = [q4 - sum(r != rnd[0] for r in rnd[1:]) / 5 for q4, rnd in LADDER]


def _rung_at(step: float) -> int:
    """Coarsest rung whose step is at most ``step`` (the finest rung if none is)."""
    return max(0, bisect.bisect_right(STEPS, step) - 1)


# rate-control probes per chunk at most, each on the first eighth of its frames: at 5 the search on
# the pedestrians clip at 45 dB ended with the passing and failing rungs 3 apart (47.1 and 44.4 dB),
# left the chunk 2 dB above its floor for the lambda control to give back, and cost 9 % more bytes
PROBES = 7
# The full encode's lambda control (ratecontrol.LambdaControl) gains about this much PSNR by lowering
# lambda, and a coarser step with a lower lambda can cost fewer bits than a finer one with a higher
# lambda, so the probes look for the coarsest rung whose prefix lands within it of the floor. Since
# bitstream 11's offsets a whole chunk falls further below its prefix (lambda scaled by 0.4-0.7 to
# land at 0.5 dB), and lambda that low codes camera noise: the corpus' 12 chunks of 32 frames cost
# 1.9 % less at 0.2 dB, 0.5 % less at 0.3 (docs/codec.md)
PROBE_SLACK_DB = 0.2
# a probe that passes by less than this is taken: a coarser rung would miss (rungs are 0.1-0.8 dB apart)
PROBE_CLOSE_DB = 0.15
RETRY_STEP = 0.85  # a full encode that misses the floor is retried at this times the step it needed, or finer


# The probe's frames rarely show what costs a pyramid most: content that changes between its
# anchors (a dialog opening, a cut), which the frames between can predict from neither side. On
# the corpus (32 frames, 40 and 45 dB) the pyramid paid where its probe cost 0.91-0.98 of display
# order's (3-D animation, the rocket launch) and lost 2-14 % where it cost 0.996-1.0 (screen,
# pedestrians, film); 2-D animation's cost 1.07 (docs/codec.md).
PYRAMID_MARGIN = 0.985
# Quarter-pel vectors (bitstream 10) where refining the half-pel ones takes the SAD of the first
# QUARTER_FRAMES frames' first vectors below QUARTER_MARGIN of theirs: on the corpus (16 frames) 0.87-0.90
# on the rocket launch and both animations, which they code in 3-13 % fewer bytes, and 0.96-0.99 on the
# film, pedestrians and screen, whose noise or still content they cost 0.2-1.8 % more (docs/codec.md)
QUARTER_MARGIN = 0.94
QUARTER_FRAMES = 8


def _probe_frames(frames: int, pyramid: bool) -> int:
    """A rate-control probe's frames: the chunk's first eighth (at least 2), with ``pyramid``
    rounded up to a whole group of ``decoder.coding_order``'s pyramid (4k + 1 frames)."""
    count = max(2, frames // 8)
    return min(frames, -(-(count - 1) // 4) * 4 + 1 if pyramid else count)


def _quarter_pays(luma, motion) -> bool:
    """Whether a chunk's vectors are refined to quarter-pels: where that takes the SAD of the first
    vectors of its first ``QUARTER_FRAMES`` frames (``motion``: the half-pel field and distances of
    the chunk in display order) below ``QUARTER_MARGIN`` of the half-pel vectors'
    (``analysis.refine_quarter``, on a copy of the field)."""
    field, distances = motion
    searches = _searches(coding_order(len(field), VERSION, False))
    before, after = analysis.refine_quarter(luma, field.copy(), searches[searches[:, 0] < QUARTER_FRAMES], distances, False)
    return after < QUARTER_MARGIN * before


def _sharp_pays(luma, order, motion, quarter: bool) -> bool:
    """Whether a chunk's half-pel samples are interpolated by ``syntax.SHARP`` rather than bilinearly:
    where its squared error over the cells that vectors move by a fraction of a pixel is the smaller
    (``analysis.subpel_errors``, ``quarter``: vectors in quarter-pels; each frame from its first reference in ``order``, with
    ``motion``'s vectors, on the frames the chunk codes). The filter predicts clean detail better
    and grain worse, and its bits follow: the corpus' error ratios (32 frames) are 0.73 and 0.88 on
    the rocket launch and 3-D animation, which it codes in fewer bytes, and 1.01-1.07 on the
    others (docs/codec.md)."""
    refs = np.full(len(order), -1, np.int64)
    for step in order:
        refs[step.f] = step.ref
    bilinear, sharp = analysis.subpel_errors(luma[: len(order)], motion[0], refs, quarter)
    return sharp < bilinear


# the rung search's first probe, in the uniform-error model's steps: at LAMBDA the chosen rungs are
# 5-13 % coarser than the model's, and starting short of them took the search two more probes
FIRST_PROBE = 1.08


def _first_rung(target_psnr: float) -> int:
    """The rung the uniform-error model predicts for ``target_psnr`` (times ``FIRST_PROBE``): the
    rate control's first probe."""
    return _rung_at(4 * initial_step(target_psnr) * FIRST_PROBE)


def _pyramid_pays(encode_at, rung: int, frames: int, pixels: int, config: EncoderConfig) -> tuple[bool, tuple[int, float]]:
    """Whether the chunk is coded as a pyramid rather than in display order: the probe's frames
    coded both ways at ``rung``, each priced by its RD cost (luma squared error of ``pixels`` a
    frame plus the nominal lambda's worth of the bits); the pyramid must cost ``PYRAMID_MARGIN``
    or less of display order's. Returns the choice and its probe (rung, luma MSE)."""
    count = _probe_frames(frames, True)
    lam = _rd_lambda(LADDER[rung][0], config)
    probes = {}
    for pyramid in (False, True):
        body, mse = encode_at(rung, count, pyramid_order=pyramid)
        probes[pyramid] = (mse * count * pixels + lam * 8 * len(body), mse)
    pyramid = probes[True][0] < PYRAMID_MARGIN * probes[False][0]
    return pyramid, (rung, probes[pyramid][1])


def _choose_rung(encode_at, target_psnr: float, probe: int, known: tuple[int, float] | None = None) -> int:
    """Coarsest rung of ``LADDER`` whose encode of a prefix of the chunk still meets the target.

    Probes the chunk's first ``probe`` frames at ``_first_rung`` (unless ``known`` already holds
    that probe's (rung, luma MSE): ``_pyramid_pays``), then where a line of log MSE against log
    step meets the target: through the two latest probes
    until one passes and one fails, then through the finest failing and the coarsest passing
    rung (PSNR against step has cliffs and small bumps; the bracket keeps the search inside),
    unless a probe passes by less than ``PROBE_CLOSE_DB``. Returns the coarsest probed rung that
    met the target; the full-chunk check in the caller has the last word.
    """
    target_mse = 255.0**2 / 10 ** (target_psnr / 10)
    rung = _first_rung(target_psnr)
    probes: dict[int, float] = {}
    for _ in range(PROBES):
        probes[rung] = known[1] if known and rung == known[0] else encode_at(rung, probe)[1]
        if probes[rung] == 0 or target_psnr <= _psnr(probes[rung]) < target_psnr + PROBE_CLOSE_DB:
            return rung
        passing = [r for r, m in probes.items() if m <= target_mse]
        failing = [r for r, m in probes.items() if m > target_mse]
        if passing and failing:
            if min(failing) - max(passing) <= 1:
                break
            (r0, m0), (r1, m1) = (max(passing), probes[max(passing)]), (min(failing), probes[min(failing)])
        elif len(probes) > 1:
            (r0, m0), (r1, m1) = list(probes.items())[-2:]
        else:
            (r0, m0), (r1, m1) = (rung, probes[rung]), (rung, probes[rung])
        # with one probe (or a flat pair), MSE grows about as the step squared
        slope = 2.0
        if r0 != r1 and m0 > 0 and m1 != m0:
            slope = min(4.0, max(1.0, math.log(m1 / m0) / math.log(STEPS[r1] / STEPS[r0])))
        guess = _rung_at(STEPS[r1] * (target_mse / m1) ** (1 / slope))
        if passing:
            guess = max(guess, max(passing) + 1)
        if failing:
            guess = min(guess, min(failing) - 1)
        guess = min(max(guess, 0), len(LADDER) - 1)
        if guess in probes:
            break
        rung = guess
    passing = [r for r, m in probes.items() if m <= target_mse]
    return max(passing) if passing else max(0, min(probes) - 1)


def encode_chunk(frames: Frames, config: EncoderConfig, generator=None, modes: ModeStats | None = None,
                 rung: int | None = None) -> EncodedChunk:
    """Encode one GOP.

    Parameters
    ----------
    frames : Frames
        1..1024 frames of any size up to 16384x16384.
    config : EncoderConfig
        ``lossless`` or ``target_psnr``: the chunk's PSNR-Y is at least that many dB.
    generator : PaletteGenerator, optional
        Proposes palettes for many-coloured blocks; default: the one named by ``config.palette``.
        Palettes are data in the payload, so decoding never needs it.
    modes : ModeStats, optional
        Receives the leaves of the encode that is kept (not of the rate control's probes), with
        where each PALETTE leaf's luma palette came from, which the decoder cannot tell.
    rung : int, optional
        Code once at this rung of ``LADDER`` (a fixed step, the nominal lambda) instead of
        controlling the rate to ``config.target_psnr``, which then sets only the denoising: for
        comparisons of encoder tools at equal quantisation, free of the rate control's choices.

    Returns
    -------
    EncodedChunk
        ``payload`` bytes and ``stats`` (frames, bytes, bpp, psnr_y, mse_y, step, rung, attempts,
        encode_seconds).
    """
    start = time.perf_counter()
    t, h, w = frames.y.shape
    if rung is not None and not 0 <= rung < len(LADDER):
        raise ValueError(f"rung {rung} is out of range (0..{len(LADDER) - 1})")
    if not 1 <= t <= MAX_FRAMES or not (1 <= h <= MAX_DIMENSION and 1 <= w <= MAX_DIMENSION):
        raise ValueError(f"chunk of {t} frames of {w}x{h} is out of range (1..{MAX_FRAMES} frames, 1..{MAX_DIMENSION} px)")
    padded = (_pad(frames.y, syntax.CTU), _pad(frames.u, syntax.CTU // 2), _pad(frames.v, syntax.CTU // 2))
    source = padded  # issue 16 item 4: lossy chunks code temporally denoised frames (prefilter.py);
    if not config.lossless:  # the floor is still checked against ``frames``, and exact coding codes ``source``
        padded = prefilter.denoise(padded, (h, w), 255.0**2 / 10 ** (config.target_psnr / 10))
    generator = generator or _generator(config.palette)
    # the analysis picks an in-codec generator's palettes itself, block by block; a lossless chunk
    # asks no batched one (its escapes are exact and rarely pay for a proposal's entries)
    if generator.in_codec or config.lossless:
        proposals = _no_proposals(padded[0].shape, min(PROPOSAL_SIZE, config.max_palette))
    else:
        proposals = _palette_proposals(*padded, config, generator)
    # Motion is searched once per chunk and coding order, between source frames, so the
    # rate-control probes and the final encode share it (searching the reconstruction would
    # repeat it per probe); the choice of order searches both orders' probe frames first.
    motion: dict[tuple[int, bool], tuple] = {}  # (frames, pyramid) -> (coding order, motion field and distances)
    attempts = 0
    counts = NO_STATS  # the leaves of the latest encode, which is the one kept
    # display order unless ``config.pyramid`` and its probe says otherwise; lossless chunks always
    # (the pyramid, 32 frames of each corpus clip: +1.3 to +6.7 %, 3-D animation -1.8 %)
    pyramid = False

    def search(count, pyramid):
        """The coding order of the first ``count`` frames and their motion, searched once."""
        if (count, pyramid) not in motion:
            order = coding_order(count, VERSION, pyramid)
            whole = motion.get((t, pyramid))
            if whole is not None and whole[0][:count] == order:  # the chunk's first frames, searched alike
                motion[count, pyramid] = order, whole[1]
            else:
                found = analysis.motion_search_chunk(padded[0][:count], config.search_range, _searches(order))
                motion[count, pyramid] = order, found
        return motion[count, pyramid]

    quarters: dict[int, np.ndarray] = {}  # id of a half-pel field -> that field refined to quarter-pels

    def refined(count, pyramid):
        """``search``'s motion with its vectors refined to quarter-pels, once."""
        order, (field, distances) = search(count, pyramid)
        if id(field) not in quarters:
            quarters[id(field)] = field.copy()
            searches = _searches(coding_order(len(field), VERSION, pyramid))
            analysis.refine_quarter(padded[0], quarters[id(field)], searches, distances, True)
        return order, (quarters[id(field)], distances)

    # first, the chunk's motion in display order: the probes take their frames' from it, and the
    # interpolation is chosen on it in either order (chosen on the pyramid's first probe frames, it
    # denied 2-D animation quarter-pels, which then cost 29 % more bytes with --pyramid; docs/codec.md)
    quarter = _quarter_pays(padded[0], search(t, False)[1])
    motion_of = refined if quarter else search
    display_order, display_motion = motion_of(t, False)
    sharp = _sharp_pays(padded[0], display_order, display_motion, quarter)
    interp = (syntax.INTERP_SHARP if sharp else 0) | (syntax.INTERP_QUARTER if quarter else 0)

    def encode_at(rung, count, config=config, control=None, pyramid_order=None):
        nonlocal attempts, counts
        attempts += 1
        coded = source if config.lossless else padded
        counts = NO_STATS if modes is None else modes.new_counts()
        body, recon = _encode_at(tuple(p[:count] for p in coded), LADDER[rung], config, proposals, generator.in_codec,
                                 *motion_of(count, pyramid if pyramid_order is None else pyramid_order), interp, control, counts)
        diff = np.subtract(recon[0][:, :h, :w], frames.y[:count], dtype=np.int32)  # half float64's time
        return body, float(np.einsum("fyx,fyx->", diff, diff, dtype=np.int64)) / diff.size

    exact = config.lossless
    if config.lossless:
        rung = 0
        body, mse = encode_at(rung, t)
    else:
        known = None
        if config.pyramid:
            at = rung if rung is not None else _first_rung(config.target_psnr - PROBE_SLACK_DB)
            pyramid, known = _pyramid_pays(encode_at, at, t, h * w, config)
        if rung is not None:
            body, mse = encode_at(rung, t)
        else:
            rung = _choose_rung(encode_at, config.target_psnr - PROBE_SLACK_DB, _probe_frames(t, config.pyramid), known)
            # the full encode spends what the rung leaves between the chunk and its floor (rungs are
            # 0.3-0.8 dB apart; the prefix misjudges chunks that change later) by scaling the RD
            # lambda frame by frame: one encode lands ~0.1 dB above the floor
            target_mse = 255.0**2 / 10 ** (config.target_psnr / 10)
            order = search(t, pyramid)[0]
            weights = np.zeros(t)  # the layered frames' MSE goes as their step squared
            for step in order:
                weights[step.f] = (LEVEL_STEP[step.level] / 64) ** 2
            coded_order = [step.f for step in order]
            control: ratecontrol.LambdaControl | None = ratecontrol.LambdaControl(frames.y, target_mse, weights=weights,
                                                                                  order=coded_order)
            body, mse = encode_at(rung, t, control=control)
            # the quality floor is a promise: step down until the whole chunk meets it, by the
            # step that the measured MSE says is needed (MSE grows about as the step squared) and
            # RETRY_STEP more, for lambda control to spend (it missed because the chunk turned
            # harder than it could foresee: a miss costs a full encode, slack does not), steering
            # further above the floor; after a second miss, at the nominal lambda (film at 50 dB
            # turned hard in its last frames, after control had spent the slack, at every rung)
            control = ratecontrol.LambdaControl(frames.y, target_mse, ratecontrol.RETRY_AIM_DB, weights, coded_order)
            while _psnr(mse) < config.target_psnr and rung > 0:
                rung = min(rung - 1, _rung_at(STEPS[rung] * math.sqrt(target_mse / mse) * RETRY_STEP))
                body, mse = encode_at(rung, t, control=control)
                control = None
            if _psnr(mse) < config.target_psnr:
                # even step 1 misses the floor where the RD trade-off still prefers skipped blocks
                # or merged palette entries (camera noise at 50 dB and more): code the chunk exactly
                exact = True
                body, mse = encode_at(0, t, replace(config, lossless=True))
    q4 = LADDER[rung][0]
    flags = ((FLAG_LOSSLESS if exact else 0) | (FLAG_PYRAMID if pyramid else 0) | (FLAG_SHARP if sharp else 0) | (FLAG_QUARTER if quarter else 0)
             | (FLAG_INTRA_TRANSFORM | FLAG_SAO if q4 > 4 else 0))
    header = HEADER.pack(MAGIC, VERSION, flags, t, w, h, q4, config.min_block, config.max_block, 0, len(body))
    payload = header + body
    if modes is not None:
        modes.add(counts, len(payload), sources=True)
    stats = {
        "frames": t,
        "bytes": len(payload),
        "bpp": 8.0 * len(payload) / (t * h * w),
        "psnr_y": _psnr(mse),
        "mse_y": mse,
        "step": q4 / 4,
        "rung": rung,
        "attempts": attempts,
        "encode_seconds": time.perf_counter() - start,
    }
    return EncodedChunk(payload, stats)
