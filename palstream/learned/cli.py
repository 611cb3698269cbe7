"""Commands of this package; registered into ``palstream.cli.app``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands to the main app."""
    app.command("train")(train)


def train(
    data: Annotated[list[Path], typer.Option("--data", help="Folder of training images and clips; repeat for several.")],
    out: Annotated[Path, typer.Option("--out", help="Weights file to write (e.g. cgan-v1.pt).")],
    holdout: Annotated[
        list[str] | None,
        typer.Option("--holdout", help="File-name pattern kept out of training and used for the held-out metric; repeatable."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps (default 2000; with --reinforce 600).", min=1)
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of data sampling and initialisation.")] = 0,
    features: Annotated[
        bool, typer.Option(help="Also condition on pooled EfficientNet-Lite0 block features (measured: no gain; off for cgan-v1).")
    ] = False,
    threads: Annotated[int, typer.Option(help="CPU threads for torch.", min=1)] = 1,
    hidden: Annotated[int, typer.Option(help="Width of the generator's hidden layers.", min=8)] = 64,
    layers: Annotated[int, typer.Option(help="Hidden layers of the generator MLP.", min=1)] = 2,
    report_dir: Annotated[
        Path | None, typer.Option(help="Where the loss plot and model card go (default: beside --out).")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint file (default: OUT + '.ckpt'); an existing one is resumed.")
    ] = None,
    reinforce: Annotated[
        bool,
        typer.Option(
            "--reinforce",
            help="Fine-tune the --init weights with REINFORCE on the measured rate-distortion cost of the blocks "
            "the codec sends to the generator (docs/tuner.md) instead of training from scratch.",
        ),
    ] = False,
    init: Annotated[Path | None, typer.Option("--init", help="With --reinforce: the weights to start from.")] = None,
    sigma: Annotated[
        float | None, typer.Option(help="With --reinforce: exploration noise on the width logits (default 0.5).")
    ] = None,
    rd_lambda: Annotated[
        float | None, typer.Option("--rd-lambda", help="With --reinforce: squared error one bit is worth (default: the codec's lambda at step 6).")
    ] = None,
) -> None:
    """Train the learned palette generator (cgan-v1) on real images and clips, or fine-tune it (--reinforce)."""
    from palstream.errors import PalstreamError

    if reinforce:
        if init is None:
            raise PalstreamError("--reinforce needs --init WEIGHTS, the generator to fine-tune (e.g. palstream/palettes/weights/cgan-v1.pt)")
        if checkpoint is not None:
            raise PalstreamError("--checkpoint is not used with --reinforce (a fine-tuning run is short); leave it out")
        _reinforce(data, out, holdout or [], init, steps or 600, seed, threads, report_dir, sigma, rd_lambda)
        return
    if init is not None or sigma is not None or rd_lambda is not None:
        raise PalstreamError("--init, --sigma and --rd-lambda only apply with --reinforce")
    steps = steps or 2000
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from palstream.learned.train import TrainConfig, Trainer, plot_history, write_model_card

    torch.set_num_threads(threads)
    config = TrainConfig(seed=seed, steps=steps, features=features, hidden=hidden, layers=layers)
    say = lambda msg: typer.echo(msg, err=True)  # noqa: E731
    trainer = Trainer(data, holdout or [], config, progress=say)
    ckpt = checkpoint or out.with_name(out.name + ".ckpt")
    if ckpt.exists():
        trainer.load_checkpoint(ckpt)
        say(f"resuming from {ckpt} at step {trainer.step}")
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("train", total=config.steps, completed=trainer.step, status="")

        def on_step(record: dict) -> None:
            status = f"loss {record['total']:.3f}"
            if "heldout_luma_ratio" in record:
                status += f"  held-out MSE/k-means: Y {record['heldout_luma_ratio']:.3f} C {record['heldout_chroma_ratio']:.3f}"
            bar.update(task, completed=record["step"], status=status)

        trainer.run(ckpt, on_step)
    sha = trainer.export(out)
    reports = report_dir or out.parent
    plot_history(trainer.history, reports / f"{out.stem}-loss.png")
    command = "palstream " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_model_card(reports / f"model-card-{out.stem}.md", trainer, sha, out, command)
    typer.echo(f"wrote {out} (sha256 {sha}); loss curves and model card in {reports}")


def _reinforce(data, out, holdout, init, steps, seed, threads, report_dir, sigma, rd_lambda) -> None:
    """``palstream train --reinforce``: one ReinforceTrainer, run with a progress bar, then export."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from palstream.learned.finetune import ReinforceConfig, ReinforceTrainer

    torch.set_num_threads(threads)
    overrides = {k: v for k, v in (("sigma", sigma), ("rd_lambda", rd_lambda)) if v is not None}
    config = ReinforceConfig(seed=seed, steps=steps, **overrides)
    say = lambda msg: typer.echo(msg, err=True)  # noqa: E731
    trainer = ReinforceTrainer(init, data, holdout, config, progress=say)
    say(f"{len(trainer.blocks[1])} candidate blocks for fine-tuning"
        + (f", {len(trainer.held[1])} held out" if trainer.held else ""))
    columns = (TextColumn("reinforce"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("reinforce", total=config.steps, status="")

        def on_step(record: dict) -> None:
            status = f"RD cost/block Y {record['policy_cost1']:.0f} C {record['policy_cost2']:.0f}"
            if "heldout_luma_cost" in record:
                base = trainer.baseline
                status += (f"  held-out vs init: Y {record['heldout_luma_cost'] / base['heldout_luma_cost']:.4f}"
                           f" C {record['heldout_chroma_cost'] / base['heldout_chroma_cost']:.4f}")
            bar.update(task, completed=record["step"], status=status)

        trainer.run(on_step)
    sha = trainer.export(out)
    report = (report_dir or out.parent) / f"{out.stem}-reinforce.json"
    trainer.report(report, out, sha, "palstream " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    typer.echo(f"wrote {out} (sha256 {sha}, fine-tuned from {init.name}); report in {report}")
