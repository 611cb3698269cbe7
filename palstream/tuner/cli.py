"""``palstream tune``: pretrain a tuner policy offline on real clips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from palstream.errors import ConfigError


def register(app: typer.Typer) -> None:
    """Add this package's commands to the main app."""
    app.command("tune")(tune)


def tune(
    out: Annotated[Path, typer.Option("--out", help="Policy file to write (JSON): a job uses it as its tuner policy.")],
    data: Annotated[
        list[str] | None, typer.Option("--data", help="A clip to measure (path or URL); repeat for several.")
    ] = None,
    frames: Annotated[int, typer.Option(help="Frames measured from the start of each clip.", min=1)] = 64,
    gop: Annotated[int, typer.Option(help="Frames per unit (the job's GOP).", min=1, max=1024)] = 8,
    target_psnr: Annotated[float, typer.Option(help="Quality floor of the measured encodes, dB PSNR-Y.")] = 45.0,
    alpha: Annotated[float, typer.Option(help="Exploration width of the policy (LinUCB alpha).", min=0.0)] = 0.5,
    measurements: Annotated[
        Path | None, typer.Option(help="Also write every per-unit, per-arm measurement here (JSON), e.g. for benchmarks/tuner_regret.py.")
    ] = None,
    from_measurements: Annotated[
        Path | None, typer.Option(help="Pretrain from measurements written earlier by --measurements instead of encoding --data.")
    ] = None,
) -> None:
    """Pretrain the tuner: encode the first frames of each clip with every arm (one thread), fit a policy."""
    from palstream.tuner.offline import MEASUREMENTS_FORMAT, measure, pretrain

    if bool(data) == (from_measurements is not None):
        raise ConfigError("give clips with --data or earlier measurements with --from-measurements, one of the two")
    if from_measurements is not None:
        try:
            found = json.loads(from_measurements.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read measurements {from_measurements} ({exc}); give a file written by --measurements") from None
        if not isinstance(found, dict) or found.get("format") != MEASUREMENTS_FORMAT:
            raise ConfigError(f"{from_measurements} is not a tuner measurements file; give a file written by --measurements")
    else:
        assert data is not None  # --data is required without --from-measurements (checked above)
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        from palstream.codec import EncoderConfig

        columns = (TextColumn("measuring {task.fields[clip]}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task("measure", total=None, clip="")
            found = measure(
                data, EncoderConfig(target_psnr=target_psnr, gop=gop), frames,
                progress=lambda clip, done, total: bar.update(task, completed=done, total=total, clip=clip),
            )
        if measurements is not None:
            measurements.write_text(json.dumps(found, indent=1) + "\n")
    agent = pretrain(found, alpha=alpha)
    clips = [c["name"] for c in found["clips"]]
    agent.save(out, trained_on={"clips": clips, "frames": found["frames"], "base": found["base"]})
    units = sum(len(c["units"]) for c in found["clips"])
    typer.echo(f"wrote {out}: {units} units x {len(found['arms'])} arms from {len(clips)} clip(s)")
