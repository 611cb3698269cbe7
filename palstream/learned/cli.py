"""Commands of this package; registered into ``palstream.cli.app``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands to the main app."""
    app.command("train")(train)


def train(
    data: Annotated[list[Path], typer.Option("--data", help="Folder of training images and clips; repeat for several.")],
    out: Annotated[Path, typer.Option("--out", help="Weights file to write (e.g. cgan-v1.pt).")],
    holdout: Annotated[
        Optional[list[str]],
        typer.Option("--holdout", help="File-name pattern kept out of training and used for the held-out metric; repeatable."),
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.", min=1)] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of data sampling and initialisation.")] = 0,
    features: Annotated[bool, typer.Option(help="Also condition on pooled EfficientNet-Lite0 block features.")] = True,
    threads: Annotated[int, typer.Option(help="CPU threads for torch.", min=1)] = 1,
    report_dir: Annotated[
        Optional[Path], typer.Option(help="Where the loss plot and model card go (default: beside --out).")
    ] = None,
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="Checkpoint file (default: OUT + '.ckpt'); an existing one is resumed.")
    ] = None,
) -> None:
    """Train the learned palette generator (cgan-v1) on real images and clips."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from palstream.learned.train import Trainer, TrainConfig, plot_history, write_model_card

    torch.set_num_threads(threads)
    config = TrainConfig(seed=seed, steps=steps, features=features)
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
