"""cgan-v1 training on a tiny real subset: the loss drops, checkpoints resume exactly, the CLI reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from palstream.cli import app
from palstream.learned.data import palette_mse
from palstream.learned.train import TrainConfig, Trainer

DATA = Path(__file__).parent / "data" / "learned"  # a 128x96 photo crop and a 3-frame 96x64 animation clip
TINY = dict(blocks_per_size={8: 160, 16: 48}, size_weights={8: 0.5, 16: 0.5}, batch=32, eval_every=5, eval_blocks=24)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def _fixed_batch_mse(trainer: Trainer) -> float:
    """Mean hard-assignment MSE of the raw network output (no rank refinement) on all training blocks."""
    total = 0.0
    with torch.no_grad():
        for data in trainer.blocks.values():
            for c, blocks, k in ((1, data.luma, data.k_luma), (2, data.chroma, data.k_chroma)):
                x = blocks.float()
                pal, _ = trainer.nets[str(c)](x, k, int(k.max()))
                total += float(palette_mse(x, pal, k).mean())
    return total


def test_a_few_steps_on_real_blocks_reduce_the_loss():
    trainer = Trainer([DATA], [], TrainConfig(steps=40, features=False, **TINY))
    before = _fixed_batch_mse(trainer)
    trainer.run()
    after = _fixed_batch_mse(trainer)
    assert after < 0.9 * before, (before, after)
    assert trainer.history[-1]["step"] == 40 and "hard1" in trainer.history[-1]


@pytest.mark.slow
def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    cfg = TrainConfig(steps=6, checkpoint_every=2, **TINY)
    straight = Trainer([DATA], ["bbb_*"], cfg)
    straight.run()

    class Stop(Exception):
        pass

    def stop_at_4(record):
        if record["step"] == 4:
            raise Stop

    ckpt = tmp_path / "run.ckpt"
    first = Trainer([DATA], ["bbb_*"], cfg)
    with pytest.raises(Stop):
        first.run(ckpt, stop_at_4)  # "killed" after step 4; the last checkpoint is step 4
    resumed = Trainer([DATA], ["bbb_*"], cfg)
    resumed.load_checkpoint(ckpt)
    assert resumed.step == 4
    resumed.run(ckpt)
    for name, value in straight.nets.state_dict().items():
        torch.testing.assert_close(resumed.nets.state_dict()[name], value, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_train_cli_writes_weights_plot_and_model_card(tmp_path):
    out = tmp_path / "tiny.pt"
    result = CliRunner().invoke(
        app, ["train", "--data", str(DATA), "--out", str(out), "--steps", "3", "--holdout", "bbb_*"]
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "tiny-loss.png").stat().st_size > 1000
    card = (tmp_path / "model-card-tiny.md").read_text()
    assert "bbb_crop.mkv" in card and "cups_crop.png" in card and "held-out" in card.lower()
    from palstream.learned.generator import CganGenerator, file_sha256

    gen = CganGenerator(device="cpu", weights=out, expected_sha256=file_sha256(out))
    assert gen.generate(torch.rand(2, 64, 1) * 255, torch.tensor([4, 4])).shape == (2, 4, 1)
    assert Path(str(out) + ".ckpt").is_file()


def test_train_cli_rejects_a_missing_data_folder(tmp_path, monkeypatch, capsys):
    from palstream import cli

    monkeypatch.setattr("sys.argv", ["palstream", "train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "w.pt")])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: training data folder") and err.count("\n") == 1


@pytest.mark.slow
def test_weights_trained_with_features_get_them_from_the_codec(tmp_path):
    """Weights trained with CNN features compute them at inference, once per frame, as in training;
    the shipped weights (trained without) take none."""
    import numpy as np

    from palstream.codec import EncoderConfig, decode_chunk, encode_chunk
    from palstream.frames import Frames
    from palstream.learned.backbone import block_features
    from palstream.learned.generator import CganGenerator

    trainer = Trainer([DATA], [], TrainConfig(steps=2, features=True, **TINY))
    trainer.run()
    trainer.export(tmp_path / "features.pt")
    generator = CganGenerator(device="cpu", weights=tmp_path / "features.pt", expected_sha256=None)
    rng = np.random.default_rng(0)
    y = rng.integers(16, 236, (2, 64, 64), dtype=np.uint8)
    u, v = (rng.integers(16, 240, (2, 32, 32), dtype=np.uint8) for _ in range(2))
    boxes = np.array([[1, 0, 32, 16], [0, 16, 8, 8], [1, 48, 48, 16]])
    got = generator.block_features(y, u, v, boxes)
    assert got is not None and got.shape == (3, trainer.backbone.channels)
    for row, (f, top, left, size) in enumerate(boxes):
        expected = block_features(trainer.backbone, y[f], u[f], v[f], np.array([[top, left, size, size]]))
        torch.testing.assert_close(got[row : row + 1], expected)
    assert CganGenerator(device="cpu").block_features(y, u, v, boxes) is None
    frames = Frames(y, u, v)
    chunk = encode_chunk(frames, EncoderConfig(target_psnr=40.0, palette="cgan-v1"), generator)
    assert decode_chunk(chunk.payload).y.shape == y.shape
