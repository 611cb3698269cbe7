"""REINFORCE fine-tuning of cgan-v1 (`palstream train --reinforce`): gradient direction, coded cost,
determinism, the CLI path and its one-line errors."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from palstream.cli import app
from palstream.errors import PalstreamError
from palstream.learned.data import Plane420
from palstream.learned.finetune import (
    ReinforceConfig,
    ReinforceTrainer,
    candidate_blocks,
    candidate_mask,
    coded_cost,
    reinforce_loss,
)
from palstream.learned.generator import SHIPPED_WEIGHTS, CganGenerator, weights_info
from palstream.learned.model import NetConfig, PaletteNet

DATA = Path(__file__).parent / "data" / "learned"  # a 128x96 photo crop and a 3-frame 96x64 animation clip
TINY = dict(steps=2, batch=4, samples=3, stride=2, eval_every=1)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def _log_prob(mean: torch.Tensor, target: torch.Tensor, sigma: float) -> float:
    return float(-0.5 * ((target - mean) / sigma).pow(2).sum())


def test_policy_gradient_raises_the_log_probability_of_the_preferred_action():
    """Cost = distance to a known action: one gradient step moves the policy's mean towards it."""
    gen = torch.Generator().manual_seed(0)
    sigma, target = 0.5, torch.linspace(-1, 1, 16)
    logits = torch.zeros(8, 16, requires_grad=True)
    z = logits.detach()[:, None, :] + sigma * torch.randn(8, 32, 16, generator=gen)
    cost = (z - target).pow(2).sum(-1).double()
    reinforce_loss(logits, z, cost, sigma).backward()
    before = _log_prob(logits.detach(), target, sigma)
    after = _log_prob(logits.detach() - 0.05 * logits.grad, target, sigma)
    assert after > before
    # and through a real PaletteNet: a few Adam steps on the same reward
    torch.manual_seed(0)
    net = PaletteNet(NetConfig(1, tokens=8, hidden=16, layers=1))
    x = torch.rand(8, 64, 1, generator=gen) * 255
    k = torch.full((8,), 16)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    start = _log_prob(net.policy(x, k, 16)[0].detach(), target, sigma)
    for _ in range(10):
        out, _ = net.policy(x, k, 16)
        z = out.detach()[:, None, :] + sigma * torch.randn(8, 16, 16, generator=gen)
        opt.zero_grad()
        reinforce_loss(out, z, (z - target).pow(2).sum(-1).double(), sigma).backward()
        opt.step()
    assert _log_prob(net.policy(x, k, 16)[0].detach(), target, sigma) > start + 1.0


def test_equal_rewards_give_no_gradient():
    logits = torch.zeros(2, 16, requires_grad=True)
    z = logits.detach()[:, None, :] + torch.randn(2, 4, 16)
    reinforce_loss(logits, z, torch.full((2, 4), 7.0, dtype=torch.float64), 0.5).backward()
    assert float(logits.grad.abs().max()) == 0.0


def test_coded_cost_counts_constriction_bits_and_side_information():
    rng = np.random.default_rng(0)
    levels = np.where(rng.random(256) < 0.25, 200.0, 40.0)
    x = torch.tensor(levels, dtype=torch.float32).reshape(1, 256, 1)
    exact = torch.tensor([[[40.0], [200.0], [120.0]]])  # entry 120 takes no pixel: not sent
    sse, bits = coded_cost(x, exact)
    p = float((levels == 200).mean())
    entropy = -256 * (p * math.log2(p) + (1 - p) * math.log2(1 - p))
    side = 2 * (8 + 9)
    assert sse[0] == 0.0
    assert side + entropy <= bits[0] <= side + entropy + 40  # ANS overhead: under one 32-bit word and a bit
    noisy = torch.rand(4, 256, 1, generator=torch.Generator().manual_seed(0)) * 255
    pal = torch.rand(4, 16, 1, generator=torch.Generator().manual_seed(1)) * 255
    same = coded_cost(noisy, pal), coded_cost(noisy, pal[:, torch.randperm(16)])
    assert np.array_equal(same[0][0], same[1][0]) and np.array_equal(same[0][1], same[1][1])  # entry order is irrelevant
    flat = torch.full((1, 256, 1), 77.0)
    sse, bits = coded_cost(flat, torch.tensor([[[77.4], [3.0]]]))  # rounded to 77: exact, one entry used
    assert sse[0] == 0.0 and bits[0] == 8 + 9
    pairs = torch.tensor([[[10.0, 20.0]] * 64])
    sse, bits = coded_cost(pairs, torch.tensor([[[11.0, 22.0]]]))
    assert sse[0] == 64 * (1 + 4) and bits[0] == 16 + 7


def test_candidate_rule_matches_the_codec():
    """Same rule as palstream.codec.chunk._palette_proposals, on the codec's 16x16 grid: blocks of
    more distinct levels than a proposal has entries."""
    rng = np.random.default_rng(1)
    text = np.where(rng.random(256) < 0.5, 20, 230).astype(np.uint8)
    text[rng.permutation(256)[:70]] = np.arange(40, 110)  # antialiasing: 72 levels, 2 dominant (73% + 14 singles)
    text = text.reshape(16, 16)
    noise = rng.integers(0, 256, size=(16, 16)).astype(np.uint8)
    flat = np.full((16, 16), 128, np.uint8)
    y = np.concatenate([text, noise, flat], 1)
    frame = Plane420(y, np.full((8, 24), 128, np.uint8), np.full((8, 24), 128, np.uint8), "toy")
    mask = candidate_mask(np.stack([text.ravel(), noise.ravel(), flat.ravel()]))
    assert mask.tolist() == [True, True, False]
    luma, chroma = candidate_blocks(frame, 16)
    assert luma.shape == (2, 256, 1) and chroma.shape == (2, 64, 2)
    assert np.array_equal(luma[0, :, 0], text.ravel()) and np.array_equal(luma[1, :, 0], noise.ravel())


def test_seeded_runs_are_identical_and_move_the_weights():
    runs = []
    for _ in range(2):
        trainer = ReinforceTrainer(SHIPPED_WEIGHTS, [DATA], [], ReinforceConfig(seed=3, **TINY))
        trainer.run()
        runs.append((trainer.nets.state_dict(), trainer.history))
    (a, ha), (b, hb) = runs
    assert ha == hb
    for name, value in a.items():
        assert torch.equal(value, b[name]), name
    shipped = CganGenerator(device="cpu").load()._nets[1].state_dict()
    assert not torch.equal(a["1.widths.weight"], shipped["widths.weight"])


def test_cli_writes_loadable_fine_tuned_weights_and_a_report(tmp_path):
    out = tmp_path / "tuned.pt"
    args = ["train", "--reinforce", "--init", str(SHIPPED_WEIGHTS), "--data", str(DATA), "--out", str(out),
            "--steps", "2", "--holdout", "bbb_*"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    info = weights_info(out)
    assert info["method"] == "reinforce" and info["steps"] == 2 and info["init"] == "cgan-v1.pt"
    assert weights_info(SHIPPED_WEIGHTS) == {}
    gen = CganGenerator(device="cpu", weights=out, expected_sha256=None)
    pal = gen.generate(torch.rand(3, 256, 1) * 255, torch.full((3,), 16))
    assert pal.shape == (3, 16, 1)
    assert (tmp_path / "tuned-reinforce.json").stat().st_size > 100


def _cli_error(monkeypatch, capsys, args: list[str]) -> str:
    from palstream import cli

    monkeypatch.setattr(sys, "argv", ["palstream", *args])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    err = capsys.readouterr().err  # progress lines may come first; the error is one line, no traceback
    assert err.endswith("\n") and err.splitlines()[-1].startswith("error: ") and "Traceback" not in err, err
    return err.splitlines()[-1]


def test_bad_input_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    out = str(tmp_path / "x.pt")
    base = ["train", "--data", str(DATA), "--out", out]
    assert "--init" in _cli_error(monkeypatch, capsys, [*base, "--reinforce"])
    assert "only apply with --reinforce" in _cli_error(monkeypatch, capsys, [*base, "--init", str(SHIPPED_WEIGHTS)])
    assert "missing" in _cli_error(monkeypatch, capsys, [*base, "--reinforce", "--init", str(tmp_path / "none.pt")])
    assert "sigma" in _cli_error(monkeypatch, capsys, [*base, "--reinforce", "--init", str(SHIPPED_WEIGHTS), "--sigma", "0"])
    flat = tmp_path / "flat"
    flat.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), (90, 120, 30)).save(flat / "flat.png")
    err = _cli_error(monkeypatch, capsys, ["train", "--data", str(flat), "--out", out, "--reinforce", "--init", str(SHIPPED_WEIGHTS)])
    assert "no candidate blocks" in err
    with pytest.raises(PalstreamError):
        ReinforceConfig(samples=1)
