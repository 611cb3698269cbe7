"""cgan-v1: shipped weights, palette shapes and ranges, determinism, weight-file errors."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from palstream.errors import ConfigError
from palstream.learned.generator import SHIPPED_SHA256, SHIPPED_WEIGHTS, CganGenerator, WeightsError, file_sha256
from palstream.learned.model import rank_lloyd, sort_blocks
from palstream.palettes import create_palette_generator
from palstream.palettes.kmeans import lloyd


def _blocks(n: int, p: int, c: int, seed: int = 0) -> torch.Tensor:
    """Blocks mixing a few flat levels with noise, like screen and animation content."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, (n, 4, c), generator=gen).float()
    pick = torch.randint(0, 4, (n, p), generator=gen)
    base = torch.gather(levels, 1, pick[..., None].expand(n, p, c))
    noise = torch.randn(n, p, c, generator=gen) * torch.rand(n, 1, 1, generator=gen) * 12
    return (base + noise).clamp(0, 255).round()


@pytest.fixture(scope="module")
def generator() -> CganGenerator:
    torch.set_num_threads(1)
    return create_palette_generator("cgan-v1", device="cpu")


@pytest.mark.parametrize("p, c", [(64, 1), (256, 1), (1024, 1), (16, 2), (64, 2)])
def test_palettes_have_the_interface_shape_and_range(generator, p, c):
    x = _blocks(7, p, c)
    k = torch.tensor([1, 2, 3, 8, 16, 33, 64])
    palettes, scores = generator.generate_with_scores(x, k)
    assert palettes.shape == (7, 64, c) and palettes.dtype == torch.float32
    assert torch.isfinite(palettes).all() and palettes.min() >= 0 and palettes.max() <= 255
    for i, ki in enumerate(k.tolist()):
        used = scores[i, :ki]
        assert (used >= 0).all() and (used[:-1] >= used[1:]).all(), "entries must be ranked by pixel share"
        assert torch.isclose(used.sum(), torch.tensor(1.0), atol=1e-5)
        assert (scores[i, ki:] == -1).all()
    # Each entry lies inside its block's range (entries are means of the block's own samples).
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    assert (palettes[:, :1] >= lo - 1e-3).all() and (palettes[:, :1] <= hi + 1e-3).all()
    assert generator.generate(x, k).shape == (7, 64, c)


def test_max_k_sets_the_palette_width(generator):
    out = generator.generate(_blocks(3, 256, 1), torch.tensor([2, 5, 3]))
    assert out.shape == (3, 5, 1)


def test_flat_levels_are_found_exactly(generator):
    """A block of 3 levels with k = 3 is reproduced without error, as k-means does."""
    x = torch.tensor([20.0, 90.0, 200.0]).repeat_interleave(torch.tensor([100, 60, 96]))[None, :, None]
    palettes = generator.generate(x, torch.tensor([3]))
    assert sorted(palettes[0, :, 0].tolist()) == [20.0, 90.0, 200.0]


def test_cpu_generation_is_deterministic(generator):
    x, k = _blocks(50, 256, 1, seed=3), torch.randint(1, 65, (50,), generator=torch.Generator().manual_seed(1))
    first = generator.generate(x, k)
    again = CganGenerator(device="cpu").generate(x, k)
    assert torch.equal(first, again)
    y = _blocks(50, 64, 2, seed=4)
    assert torch.equal(generator.generate(y, k), CganGenerator(device="cpu").generate(y, k))


@pytest.mark.parametrize(
    "pixels, channels, k, seed", [(256, 1, 4, 5), (64, 2, 4, 13), (64, 2, 16, 13)], ids=["luma-4", "chroma-4", "chroma-16"]
)
def test_quality_is_near_kmeans(generator, pixels, channels, k, seed):
    x = _blocks(200, pixels, channels, seed=seed)
    kk = torch.full((200,), k)
    kmeans = create_palette_generator("kmeans", device="cpu").generate(x, kk)
    mse = lambda pal: torch.cdist(x, pal).pow(2).amin(-1).mean()  # noqa: E731
    assert mse(generator.generate(x, kk)) <= 1.1 * mse(kmeans)


def test_rank_lloyd_matches_lloyd_for_luma():
    """The sorted-domain update is exactly one Lloyd step in 1-D."""
    x = _blocks(20, 256, 1, seed=6)
    k = torch.randint(2, 17, (20,), generator=torch.Generator().manual_seed(2))
    start = torch.sort(torch.rand(20, 16, 1, generator=torch.Generator().manual_seed(3)) * 255, dim=1).values
    ordered, keys, axis, _, _ = sort_blocks(x)
    ours, shares, sse = rank_lloyd(ordered, keys, axis, start, k, steps=1)
    ref = lloyd(x, start, k, 1)
    active = torch.arange(16)[None, :] < k[:, None]
    torch.testing.assert_close(ours[active], ref[active], atol=1e-3, rtol=0)
    assert torch.allclose(shares.sum(1), torch.ones(20))
    # The prefix-sum error equals the nearest-entry error of the returned palette.
    direct = torch.cdist(x, ours).pow(2).masked_fill(~active[:, None, :], float("inf")).amin(-1).sum(1)
    torch.testing.assert_close(sse.float(), direct, rtol=1e-4, atol=1e-2)


def test_shipped_weights_load_offline_with_the_recorded_hash(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("weights must load without network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert SHIPPED_WEIGHTS.stat().st_size <= 10 * 1024 * 1024
    assert file_sha256(SHIPPED_WEIGHTS) == SHIPPED_SHA256
    blob = torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True)
    assert blob["format"] == "palstream-cgan/1"
    gen = CganGenerator(device="cpu")
    assert gen.weights_hash == SHIPPED_SHA256


def test_construction_is_lazy(tmp_path):
    gen = CganGenerator(device="cpu", weights=tmp_path / "absent.pt")  # nothing is read yet
    with pytest.raises(WeightsError):
        gen.load()


def _one_line_error(gen: CganGenerator) -> str:
    with pytest.raises(WeightsError) as info:
        gen.generate(_blocks(2, 64, 1), torch.tensor([2, 2]))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_weights_give_one_line_error(tmp_path):
    message = _one_line_error(CganGenerator(device="cpu", weights=tmp_path / "nope.pt"))
    assert "missing" in message and "nope.pt" in message


def test_corrupt_weights_give_one_line_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02 definitely not a torch file" * 10)
    assert "corrupt" in _one_line_error(CganGenerator(device="cpu", weights=bad, expected_sha256=None))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(SHIPPED_WEIGHTS.read_bytes()[:5000])
    assert "corrupt" in _one_line_error(CganGenerator(device="cpu", weights=truncated, expected_sha256=None))


def test_wrong_hash_gives_one_line_error(tmp_path):
    other = tmp_path / "cgan-v1.pt"
    data = bytearray(SHIPPED_WEIGHTS.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the tensor data
    other.write_bytes(bytes(data))
    message = _one_line_error(CganGenerator(device="cpu", weights=other, expected_sha256=SHIPPED_SHA256))
    assert "sha256" in message and "reinstall" in message


def test_cli_prints_weight_errors_as_one_line(tmp_path, monkeypatch, capsys):
    """At the CLI edge a WeightsError is `error: ...` and exit 1, never a traceback."""
    from palstream import cli

    def fail(**kwargs):  # stands in for the typer app, which main() calls with standalone_mode
        CganGenerator(device="cpu", weights=tmp_path / "gone.pt").load()

    monkeypatch.setattr(cli, "app", fail)
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: palette generator weights") and err.count("\n") == 1


def test_backbone_loads_offline_and_pools_block_features(monkeypatch, generator):

    from palstream.learned.backbone import block_features, create_backbone

    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network used")))
    backbone = create_backbone("efficientnet-lite0")
    rng = np.random.default_rng(0)
    y = rng.integers(16, 236, (72, 104), dtype=np.uint8)
    u, v = (rng.integers(16, 240, (36, 52), dtype=np.uint8) for _ in range(2))
    boxes = np.array([[0, 0, 16, 16], [16, 32, 32, 32], [64, 96, 8, 8]])
    feats = block_features(backbone, y, u, v, boxes)
    assert feats.shape == (3, backbone.channels) and torch.isfinite(feats).all()
    # The shipped weights accept such features through the extended call.
    x = torch.from_numpy(y[:16, :16].reshape(1, 256, 1).astype("float32"))
    palettes, _ = generator.generate_with_scores(x, torch.tensor([4]), feats[:1])
    assert palettes.shape == (1, 4, 1)


def _partition_sse(x: torch.Tensor, label: torch.Tensor, kmax: int) -> torch.Tensor:
    """Squared error of each block's pixels about the mean of their group (N,)."""
    onehot = torch.nn.functional.one_hot(label, kmax).double()  # (N, P, K)
    cnt = onehot.sum(1)
    means = onehot.transpose(1, 2) @ x.double() / cnt.clamp(min=1)[..., None]
    return (x.double() - torch.gather(means, 1, label[..., None].expand_as(x))).pow(2).sum((1, 2))


def _summarised(x: torch.Tensor, k: torch.Tensor, kmax: int, tokens: int = 32) -> dict:
    """Run the first chroma kernel on blocks (N, P, 2); its outputs, plus each block's sorted samples and keys."""
    from palstream.learned import chroma

    n, p, _ = x.shape
    out = dict(
        order=np.empty((n, p), np.int32), axis=np.empty((n, 2)), cond=np.empty((n, 2 * tokens + 4 + 64), np.float32),
        rows=np.empty(n, np.int64), palettes=np.empty((n, kmax, 2), np.float32), shares=np.empty((n, kmax), np.float32),
    )
    ranks = torch.linspace(0, p - 1, tokens).round().long().numpy()
    out["todo"] = chroma.summarise(x.numpy(), k.numpy(), ranks, *out.values())
    out["ordered"] = np.take_along_axis(x.numpy(), out["order"][..., None].astype(np.int64), 1).astype(np.float64)
    out["keys"] = out["ordered"][..., 0] * out["axis"][:, :1] + out["ordered"][..., 1] * out["axis"][:, 1:]
    return out


def test_chroma_summary_is_what_the_network_was_trained_on():
    """The kernel's sort and conditioning vector agree with sort_blocks/rank_tokens/condition (float32 rounding)."""
    from palstream.learned.model import condition, rank_tokens

    x = _blocks(40, 64, 2, seed=21)
    k = torch.randint(1, 65, (40,), generator=torch.Generator().manual_seed(22))
    out = _summarised(x, k, 64)
    ordered, keys, axis, mean, spread = sort_blocks(x)
    assert (np.diff(out["keys"], axis=1) >= 0).all()
    torch.testing.assert_close(torch.from_numpy(out["keys"]).float(), keys, atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.from_numpy(out["axis"]).float(), axis, atol=1e-5, rtol=0)
    rows = torch.from_numpy(out["rows"][: out["todo"]])
    assert 20 < len(rows) < 40, "blocks with at most k distinct pairs skip the network"
    expected = condition(rank_tokens(ordered, 32), mean, spread, k)[rows]
    cond = torch.from_numpy(out["cond"][: out["todo"]])
    # Samples with equal keys may come in another order; tokens are compared on blocks without such ties.
    unique = torch.tensor([len(set(map(tuple, ordered[b].tolist()))) == len(set(keys[b].tolist())) for b in rows.tolist()])
    assert unique.sum() > 10
    torch.testing.assert_close(cond[unique], expected[unique], atol=1e-4, rtol=1e-4)


def test_chroma_blocks_with_few_pairs_get_them_exactly():
    pairs = torch.tensor([[10.0, 200.0], [90.0, 90.0], [200.0, 30.0]])
    x = pairs[torch.tensor([0, 1, 2, 1] * 16)][None]
    out = _summarised(x, torch.tensor([4]), 4)
    assert out["todo"] == 0
    assert sorted(map(tuple, out["palettes"][0, :3].tolist())) == sorted(map(tuple, pairs.tolist()))
    assert sorted(out["shares"][0].tolist()) == [0.0, 0.25, 0.25, 0.5]


def test_chroma_principal_axis_is_the_half_angle():
    from palstream.learned.chroma import principal_axis

    rng = np.random.default_rng(23)
    cases = [(c, c, 0.0) for c in (0.0, 2.0)] + [(1.0, 3.0, 0.0), (3.0, 1.0, 0.0), (1.0, 3.0, -0.5), (2.0, 2.0, 1.0)]
    cases += [tuple(v) for v in rng.normal(size=(200, 3))]
    for cxx, cyy, cxy in cases:
        angle = 0.5 * np.arctan2(2 * cxy, cxx - cyy)
        np.testing.assert_allclose(principal_axis(cxx, cyy, cxy), (np.cos(angle), np.sin(angle)), atol=1e-12)


def test_chroma_nearest_entries_match_brute_force():
    """The search pruned by key difference finds the same nearest entry (lowest index on ties) as trying all."""
    from palstream.learned.chroma import nearest_labels

    x = _blocks(30, 64, 2, seed=24)
    out = _summarised(x, torch.full((30,), 16), 16)
    rng = np.random.default_rng(25)
    for b in range(30):
        ordered, keys = out["ordered"][b], out["keys"][b]
        pal = ordered[rng.integers(0, 64, 16)] + rng.integers(-3, 4, (16, 2)) * 0.5  # duplicates and ties
        label = np.empty(64, np.int64)
        nearest_labels(ordered, keys, pal, out["axis"][b, 0], out["axis"][b, 1], 16, np.empty(16, np.int64), np.empty(16), label)
        dist = ((ordered[:, None, :] - pal[None]) ** 2).sum(-1)
        assert (label == dist.argmin(1)).all()


def test_chroma_merge_and_split_moves_never_raise_the_error():
    """A move is made only where the split gains more than the merge costs; the moments follow the labels."""
    from palstream.learned.chroma import cell_moments, merge_split_moves, move_scratch

    x = _blocks(64, 64, 2, seed=7)
    k = torch.randint(3, 17, (64,), generator=torch.Generator().manual_seed(8))
    label = torch.randint(0, 1 << 30, (64, 64), generator=torch.Generator().manual_seed(9)) % k[:, None]
    before = _partition_sse(x, label, 16)
    moved = label.numpy().copy()
    mom, scratch = np.empty((16, 6)), move_scratch(16)
    for b in range(64):
        block = x[b].double().numpy()
        cell_moments(block, moved[b], mom)
        merge_split_moves(block, moved[b], int(k[b]), 4, mom, scratch)
        check = np.empty((16, 6))
        cell_moments(block, moved[b], check)
        np.testing.assert_allclose(mom, check, rtol=1e-12, atol=1e-9)
    moved = torch.from_numpy(moved)
    after = _partition_sse(x, moved, 16)
    assert (moved < k[:, None]).all(), "labels stay within each block's palette"
    assert (after <= before + 1e-6).all()
    assert (after < before - 1e-6).float().mean() > 0.5, "random partitions should mostly improve"


def test_chroma_axis_error_is_the_partition_error():
    """The prefix-sum error of a chroma partition along the principal axis equals the direct one."""
    from palstream.learned.chroma import axis_lloyd, prefix_table

    x = _blocks(20, 64, 2, seed=10)
    k = torch.randint(2, 9, (20,), generator=torch.Generator().manual_seed(11))
    out = _summarised(x, k, 8)
    start = torch.rand(20, 8, generator=torch.Generator().manual_seed(12)).double().numpy() * 300 - 50
    table, bounds, means = np.empty((65, 5)), np.empty(9, np.int64), np.empty((8, 2))
    for b in range(20):
        kk = int(k[b])
        ordered = out["ordered"][b]
        prefix_table(ordered, out["keys"][b], table)
        sse = axis_lloyd(ordered, out["keys"][b], table, start[b, :kk].copy(), kk, 2, 1, bounds, means)
        assert bounds[0] == 0 and bounds[kk] == 64 and (np.diff(bounds[: kk + 1]) >= 0).all()
        # Cells are consecutive ranks; measure that partition directly.
        label = torch.from_numpy((np.arange(64)[:, None] >= bounds[None, 1:kk]).sum(1))[None]
        direct = _partition_sse(torch.from_numpy(ordered)[None], label, kk)
        np.testing.assert_allclose(sse, float(direct[0]), rtol=1e-9, atol=1e-6)
        for j in range(kk):  # each entry is its cell's mean
            if bounds[j + 1] > bounds[j]:
                np.testing.assert_allclose(means[j], ordered[bounds[j] : bounds[j + 1]].mean(0), rtol=1e-12)


def test_luma_histogram_error_is_the_nearest_entry_error():
    """Lloyd updates and merge-and-split moves on the level histogram report the exact error of what they return."""
    from palstream.learned.decoding import LevelHistogram, level_counts

    x = _blocks(30, 256, 1, seed=14)
    k = torch.randint(2, 17, (30,), generator=torch.Generator().manual_seed(15))
    counts, _ = level_counts(x[..., 0].long())
    start = torch.sort(torch.rand(30, 1, 16, generator=torch.Generator().manual_seed(16)) * 255, dim=-1).values.double()
    entries, cells, sse = LevelHistogram(counts, 256).lloyd(start, k, steps=2, swaps=3)
    active = torch.arange(16)[None, :] < k[:, None]
    direct = (x - entries[:, 0, None, :].float()).pow(2).masked_fill(~active[:, None, :], float("inf")).amin(-1).sum(1)
    torch.testing.assert_close(sse[:, 0].float(), direct, rtol=1e-5, atol=1e-2)
    assert torch.equal(cells[:, 0].sum(1), torch.full((30,), 256.0, dtype=cells.dtype))


def test_model_card_records_the_shipped_hash():
    from pathlib import Path

    card = (Path(__file__).resolve().parent.parent / "docs" / "model-card-cgan-v1.md").read_text()
    assert SHIPPED_SHA256 in card


@pytest.mark.parametrize("c", [1, 2])
def test_single_entry_palettes_and_empty_batches(generator, c):
    """k = 1 everywhere is the block mean; an empty batch gives an empty result, as k-means does."""
    x = _blocks(5, 64, c, seed=17)
    palettes = generator.generate(x, torch.ones(5, dtype=torch.long))
    assert palettes.shape == (5, 1, c)
    torch.testing.assert_close(palettes[:, 0], x.mean(1), atol=1e-3, rtol=0)
    empty = torch.zeros(0, 64, c)
    none = torch.zeros(0, dtype=torch.long)
    assert generator.generate(empty, none).shape == (0, 1, c)
    assert create_palette_generator("kmeans", device="cpu").generate(empty, none).shape == (0, 1, c)


@pytest.mark.parametrize(
    "module", ["palstream.learned.model", "palstream.learned.generator", "palstream.palettes", "palstream.palettes.kmeans"]
)
def test_palette_modules_import_first_in_a_fresh_process(module):
    """No import cycle between palettes/ and learned/: each imports first, on its own."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_generators_by_name_load_their_module_on_first_use():
    from palstream.palettes import palette_generator_names

    assert {"kmeans", "cgan-v1"} <= set(palette_generator_names())
    assert create_palette_generator("cgan-v1", device="cpu").name == "cgan-v1"
    with pytest.raises(ConfigError, match="unknown palette generator 'nope'"):
        create_palette_generator("nope")
