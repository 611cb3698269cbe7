"""``palstream catalogue rebuild``, ``palstream ls`` and ``palstream serve``: thin commands over ``palstream.catalogue``."""

from __future__ import annotations

import json
import socket
from typing import Annotated

import typer

from palstream.batch.cli import EndpointOpt, ProfileOpt
from palstream.errors import PalstreamError

RootArg = Annotated[
    str, typer.Argument(help="A job's output root or any folder of archives: a path or URL (s3://...).")
]
CatalogueOpt = Annotated[
    str | None,
    typer.Option(
        "--catalogue", help="SQLite file to use instead of ROOT/_palstream/catalogue.sqlite (for a read-only root)."
    ),
]

catalogue_app = typer.Typer(
    help="The library catalogue of an output root (ROOT/_palstream/catalogue.sqlite).", no_args_is_help=True
)


def _catalogue(root: str, catalogue: str | None, storage_profile: str | None, endpoint_url: str | None):
    """The catalogue of ROOT, with storage options resolved as for every other command (storage/README.md)."""
    from palstream.batch.spec import StorageSpec
    from palstream.catalogue.index import Catalogue
    from palstream.storage import Location

    spec = StorageSpec.from_dict({"profile": storage_profile, "endpoint_url": endpoint_url}, where="command line")
    return Catalogue.of(Location.of(root, spec.options(root)), catalogue)


@catalogue_app.command("rebuild")
def rebuild(
    root: RootArg,
    catalogue: CatalogueOpt = None,
    storage_profile: ProfileOpt = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Index every archive under ROOT again, from the archives themselves."""
    from palstream.catalogue.index import rebuild as run

    cat = _catalogue(root, catalogue, storage_profile, endpoint_url)
    result = run(cat)
    typer.echo(f"catalogued {result['archives']} archive(s) under {root} in {cat.path}")


def ls(
    root: RootArg,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object: the archives and their totals.")
    ] = False,
    search: Annotated[
        str, typer.Option("--search", "-s", help="Words that must appear in the path, name, URL or SHA-256.")
    ] = "",
    sort: Annotated[
        str,
        typer.Option(help="Sort key: path, source_name, state, fixity, frames, bpp, ratio, psnr_min, verified_at, ..."),
    ] = "path",
    catalogue: CatalogueOpt = None,
    storage_profile: ProfileOpt = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """List the archives under ROOT from its catalogue (brought up to date first)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from palstream.catalogue import index
    from palstream.catalogue.formatting import duration, number, size

    cat = _catalogue(root, catalogue, storage_profile, endpoint_url)
    index.refresh(cat)
    rows = index.list_archives(cat, query=search, sort=sort)
    totals = index.totals(rows)
    if as_json:
        typer.echo(json.dumps({"root": cat.location.redacted, "archives": rows, "totals": totals}))
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("archive", overflow="fold", min_width=min(40, max((len(r["path"]) for r in rows), default=7)))
    for col in ("state", "fixity", "frames", "duration", "payload", "ratio", "min PSNR-Y"):
        table.add_column(col, justify="left" if col in ("state", "fixity") else "right", no_wrap=True)
    for r in rows:
        psnr = f"{r['psnr_min']:.2f} dB" if r["psnr_min"] is not None else ("exact" if r["exact_chunks"] else "-")
        table.add_row(
            r["path"],
            r["state"],
            r["fixity"],
            str(r["frames"] or "-"),
            duration(r["duration_s"]),
            size(r["payload_bytes"]),
            f"{number(r['ratio'], 1)}x" if r["ratio"] else "-",
            psnr,
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # scripts and pagers: no 80-column default squeezing the table
    console.print(table)
    console.print(
        f"{totals['archives']} archive(s), {totals['frames']} frames, {duration(totals['duration_s'])}, "
        f"source {size(totals['source_bytes'])}, payload {size(totals['payload_bytes'])}",
        markup=False,
    )


def serve(
    root: RootArg,
    host: Annotated[
        str,
        typer.Option(help="Interface to listen on (keep 127.0.0.1 unless the network is trusted: there is no login)."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8765,
    catalogue: CatalogueOpt = None,
    storage_profile: ProfileOpt = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Browse, search, check and play back the archives under ROOT in a web browser (read-only)."""
    try:
        import uvicorn

        from palstream.catalogue.server import LOCAL_HOSTS, create_app
    except ModuleNotFoundError as exc:
        raise PalstreamError(
            f"serve needs palstream's 'serve' extra ({exc.name} is not installed); install it with: pip install 'palstream[serve]'"
        ) from None
    if not 0 < port < 65536:
        raise PalstreamError(f"--port {port} is not a TCP port; give 1..65535")
    try:  # uvicorn reports a taken port in several log lines; one error line here instead
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise PalstreamError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or --host"
        ) from None
    # Bound to every interface, the user has chosen the network: any Host name is accepted then.
    hosts = ["*"] if host in ("0.0.0.0", "::") else [*LOCAL_HOSTS, host]
    cat = _catalogue(root, catalogue, storage_profile, endpoint_url)
    app = create_app(cat.location, cat.path, hosts=hosts)
    typer.echo(f"serving {root} at http://{host}:{port}/ (Ctrl-C stops)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    """Add this package's commands to the main app."""
    app.add_typer(catalogue_app, name="catalogue")
    app.command()(ls)
    app.command()(serve)
