"""palstream.storage: one Location value (url + fsspec options) for every input, archive and root."""

import pickle

import pytest

from palstream.errors import ArchiveError, InputError, PalstreamError
from palstream.storage import Location, redact_url, storage_error

S3 = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}


@pytest.mark.parametrize("url", ["/data/clip.mkv", "clip.mkv", "file:///data/clip.mkv", "local:///data/clip.mkv"])
def test_local_locations_drop_their_options(url):
    location = Location.of(url, S3)
    assert location.is_local and location.options == {}
    assert location.local_path.endswith("clip.mkv") and "://" not in location.local_path


@pytest.mark.parametrize("url", ["s3://bucket/clip.mkv", "memory://x/clip.mkv", "https://host/clip.mkv"])
def test_remote_locations_keep_their_options(url):
    location = Location.of(url, S3)
    assert not location.is_local and location.options == S3 and location.local_path is None


def test_of_takes_a_location_as_is_and_refuses_options_beside_it():
    location = Location("s3://bucket/x", S3)
    assert Location.of(location) is location
    with pytest.raises(TypeError, match="inside the Location"):
        Location.of(location, S3)


def test_a_location_prints_without_credentials():
    location = Location.of("s3://KEY:SECRET@bucket/a.zarr?X-Amz-Signature=abc", {"secret": "s"})
    for shown in (str(location), repr(location), f"{location}", location.redacted):
        assert "SECRET" not in shown and "abc" not in shown and "'s'" not in shown
    assert location.url.startswith("s3://KEY:SECRET@")  # what storage calls get


def test_child_keeps_the_options_and_joins_with_one_slash():
    child = Location("s3://bucket/root/", S3).child("a", "b.zarr")
    assert child == Location("s3://bucket/root/a/b.zarr", S3)


def test_a_location_crosses_process_boundaries_and_hashes_by_url():
    location = Location("s3://bucket/x", S3)
    assert pickle.loads(pickle.dumps(location)) == location  # Dask pickles task arguments
    assert hash(location) == hash(Location("s3://bucket/x", {"other": 1}))
    assert location != Location("s3://bucket/x", {"other": 1})


def test_filesystem_and_zarr_arguments():
    fs, path = Location("memory://storage-test/dir/").filesystem()
    fs.pipe_file(f"{path}/a", b"1")
    assert fs.cat_file(f"{path}/a") == b"1" and not path.endswith("/")
    assert Location("/data/a.zarr").zarr_args() == {"store": "/data/a.zarr"}  # zarr's LocalStore
    assert Location("file:///data/a.zarr").zarr_args()["storage_options"] == {"auto_mkdir": True}
    assert Location("s3://b/a.zarr", S3).zarr_args() == {"store": "s3://b/a.zarr", "storage_options": S3}


def test_an_unknown_protocol_is_one_line_naming_the_url():
    with pytest.raises(PalstreamError, match=r"cannot open nosuch://\*\*\*@x/y: .*; check the URL"):
        Location("nosuch://user:pw@x/y").filesystem()


def test_storage_error_takes_a_location_and_ignores_local_ones():
    assert storage_error(ConnectionRefusedError(), Location("/data/x.zarr"), "write archive") is None
    error = storage_error(ConnectionRefusedError(), Location("s3://k:s@b/x.zarr", S3), "write archive", ArchiveError)
    assert isinstance(error, ArchiveError) and "s3://***@b/x.zarr" in str(error) and "k:s" not in str(error)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("s3://AKIAEXAMPLE:se/cr+et@bucket/a/x.mkv", "s3://***@bucket/a/x.mkv"),
        ("https://user:pass@host:8443/x.mkv", "https://***@host:8443/x.mkv"),
        (
            "https://b.s3.amazonaws.com/x.mkv?X-Amz-Credential=AK%2F1&X-Amz-Signature=ab12&X-Amz-Security-Token=t&part=2",
            "https://b.s3.amazonaws.com/x.mkv?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***&part=2",
        ),
        ("https://acct.blob.core.windows.net/c/x.mkv?sv=2022&sig=abc%3D", "https://acct.blob.core.windows.net/c/x.mkv?sv=2022&sig=***"),
        ("https://host/x.mkv?token=abc", "https://host/x.mkv?token=***"),
        ("s3://bucket/folder@2x/x.mkv", "s3://bucket/folder@2x/x.mkv"),
        ("http://host:9000/x@y.mkv", "http://host:9000/x@y.mkv"),
        ("/data/p@th:1/x.mkv", "/data/p@th:1/x.mkv"),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_storage_error_leaves_local_and_unknown_failures_to_the_caller():
    assert storage_error(PermissionError("denied"), "/data/x.mkv", "read input") is None
    assert storage_error(KeyError("x"), "s3://b/x.mkv", "read input") is None
    error = storage_error(ConnectionRefusedError(), "s3://k:s@b/x.mkv", "write archive")
    assert isinstance(error, PalstreamError) and "s3://***@b/x.mkv" in str(error)


def test_storage_error_reads_http_statuses_through_fsspec_wrapping():
    # fsspec's HTTP filesystem reports any failed request as FileNotFoundError raised from aiohttp's error
    # (moto answers signed URLs with 500 once its auth is on, so this status comes from a built exception)
    from aiohttp import ClientResponseError

    url = "https://host/x.mkv?X-Amz-Signature=abc"
    try:
        try:
            raise ClientResponseError(None, (), status=403, message="Forbidden")
        except ClientResponseError as exc:
            raise FileNotFoundError(url) from exc
    except FileNotFoundError as wrapped:
        error = storage_error(wrapped, url, "read input", InputError)
    assert isinstance(error, InputError)
    assert str(error) == (
        "cannot read input https://host/x.mkv?X-Amz-Signature=***: access denied (403); "
        "check the URL's credentials, token or signature (signed URLs expire)"
    )
    assert storage_error(FileNotFoundError(url), url, "read input") is None  # a plain 404: the caller's "does not exist"


def test_rename_exchange_swaps_two_folders_in_one_step(tmp_path):
    import errno

    from palstream.storage import rename_exchange

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "f").write_text("b")
    try:
        rename_exchange(str(tmp_path / "a"), str(tmp_path / "b"))
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EINVAL):
            pytest.skip(f"this system or filesystem has no atomic exchange ({exc}); archive.py falls back to two renames")
        raise
    assert (tmp_path / "a" / "f").read_text() == "b" and (tmp_path / "b" / "f").read_text() == "a"
    with pytest.raises(OSError):
        rename_exchange(str(tmp_path / "a"), str(tmp_path / "missing"))
