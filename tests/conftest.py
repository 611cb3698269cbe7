"""Shared fixtures: the small real clips in tests/data and an in-process CLI runner."""

from __future__ import annotations

import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def data_dir() -> Path:
    """Folder of the small real test clips (see tests/data/README.md)."""
    return DATA


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run ``palstream ARGS...`` through the console-script entry point, in this process."""
    from palstream.cli import main

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["palstream", *map(str, args)])
        monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


@pytest.fixture(scope="session")
def lossless_archive(tmp_path_factory) -> Path:
    """The 37x29 screen clip (6 frames), encoded losslessly in GOPs of 2: three chunks."""
    from palstream.codec import EncoderConfig
    from palstream.pipeline import encode_file

    path = tmp_path_factory.mktemp("archives") / "screen_lossless.zarr"
    encode_file(str(DATA / "screen_37x29.mkv"), str(path), EncoderConfig(lossless=True, gop=2))
    return path


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1 with one bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    ).create_bucket(Bucket="archives")
    yield endpoint
    server.stop()
