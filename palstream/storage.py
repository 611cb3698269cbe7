"""Where palstream reads and writes: one :class:`Location` value (a path or fsspec URL with its options).

Every input, archive and output root is a :class:`Location`. Its fsspec storage options (an S3
endpoint, a profile) apply only to remote protocols, so one set of options can serve a job whose
input is local and whose archive is on S3, or the other way round. Whether a location is local is
decided here and nowhere else. A location prints redacted (:func:`redact_url`): credentials in a URL
never reach a message or a log.

Low layer: imports only :mod:`palstream.errors` and third-party libraries.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit

import fsspec
import fsspec.utils

from palstream.errors import PalstreamError

LOCAL_PROTOCOLS = ("file", "local")


@dataclass(frozen=True)
class Location:
    """A local path or fsspec URL plus the fsspec options used to reach it.

    Build one with :meth:`of`. Frozen: a location can be passed to Dask tasks and compared.

    Attributes
    ----------
    url : str
        A local path, a ``file://`` URL, or any fsspec URL (``s3://bucket/key``).
    options : dict
        fsspec storage options; always empty for a local location. Not hashed (a dict); do not
        change it in place.
    """

    url: str
    options: dict = field(default_factory=dict, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "url", os.fspath(self.url))
        object.__setattr__(self, "options", {} if self.is_local else dict(self.options or {}))

    @classmethod
    def of(cls, value: str | os.PathLike | Location, options: Mapping | None = None) -> Location:
        """The location ``value`` names: a :class:`Location` as is, a path or URL with ``options``.

        The one way entry points turn what a caller gave into a location (a plain string is a
        location without options).
        """
        if isinstance(value, Location):
            if options:
                raise TypeError("give the storage options inside the Location, not beside it")
            return value
        return cls(os.fspath(value), dict(options or {}))

    @property
    def protocol(self) -> str:
        """fsspec's protocol of the URL: ``"file"`` for a plain path."""
        return fsspec.utils.get_protocol(self.url)

    @property
    def is_local(self) -> bool:
        """Whether the location is on this machine's filesystem (a path, ``file://``, ``local://``)."""
        return self.protocol in LOCAL_PROTOCOLS

    @property
    def local_path(self) -> str | None:
        """The filesystem path of a local location (its URL without ``file://``); None if remote."""
        if not self.is_local:
            return None
        return self.url.split("://", 1)[1] if "://" in self.url else self.url

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """``(fs, path)`` from fsspec's ``url_to_fs`` with this location's options, the path without a
        final ``/``; wrapped so that a URL fsspec cannot open is one line naming it (redacted).

        Raises
        ------
        PalstreamError
            The URL names no usable filesystem (an unknown protocol, a backend not installed).
        """
        try:
            fs, path = fsspec.core.url_to_fs(self.url, **self.options)
        except (ValueError, ImportError, OSError) as exc:
            raise PalstreamError(f"cannot open {self}: {exc}; check the URL") from None
        return fs, path.rstrip("/") or path

    def child(self, *parts: str) -> Location:
        """``self/part/...`` with the same options (``/`` for local paths and URLs alike: fsspec's
        paths are posix-style on every protocol, and ``os.path.join`` would not be on Windows)."""
        return Location("/".join([self.url.rstrip("/"), *parts]), self.options)

    def zarr_args(self) -> dict:
        """Keyword arguments that open this location with ``zarr.open_group(**args, mode=...)``.

        A plain path gets zarr's LocalStore (atomic create-if-absent); a URL gets zarr's
        FsspecStore with the options, plus ``auto_mkdir`` for ``file://`` (zarr needs it to
        create a new local folder through fsspec).
        """
        if "://" not in self.url:
            return {"store": self.url}
        options = dict(self.options)
        if self.is_local:
            options["auto_mkdir"] = True
        return {"store": self.url, "storage_options": options}

    @property
    def redacted(self) -> str:
        """The URL without credentials: what may be stored, logged or printed."""
        return redact_url(self.url)

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return f"Location({self.redacted!r})"  # options may hold secrets


def rename_exchange(a: str, b: str) -> None:
    """Swap two local paths atomically (Linux renameat2 RENAME_EXCHANGE; neither os nor fsspec has it).

    Raises
    ------
    OSError
        The system has no ``renameat2`` (``ENOSYS``) or the filesystem refuses the exchange.
    """
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is unavailable")
    at_fdcwd, exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


# Query parameters that carry secrets in presigned / SAS / token URLs (S3, GCS, Azure, generic).
_SECRET_QUERY = re.compile(r"signature|sig$|token|secret|passw|credential|key|auth", re.IGNORECASE)
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>[^?#]*)(?P<query>\?[^#]*)?(?P<frag>#.*)?$")


def redact_url(url: str | Location) -> str:
    """``url`` with its credentials replaced by ``***``: what may be stored, logged or printed.

    Removes the user-info part (``s3://KEY:SECRET@bucket/x``, ``https://user:pass@host/x``) and
    the values of query parameters that carry secrets (``X-Amz-Signature``, ``X-Amz-Credential``,
    ``X-Amz-Security-Token``, ``sig``, ``token``, ``key``, ...). Local paths are returned unchanged.

    Parameters
    ----------
    url : str or Location
        A path or URL.

    Returns
    -------
    str
        The same location without secrets.
    """
    text = url.url if isinstance(url, Location) else str(url)
    match = _URL.match(text)
    if match is None:
        return text
    scheme, rest = match["scheme"], match["rest"]
    authority = rest.split("/", 1)[0]
    if "@" in authority:
        rest = "***@" + rest[authority.rindex("@") + 1 :]
    elif ":" in authority and not authority.rsplit(":", 1)[1].isdigit() and "@" in rest:
        # an AWS secret key may contain "/", which splits the user-info across the path
        rest = "***@" + rest[rest.index("@") + 1 :]
    query = match["query"] or ""
    if len(query) > 1:
        pairs = parse_qsl(query[1:], keep_blank_values=True)
        query = "?" + urlencode([(k, "***" if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*/:")
    return scheme + rest + query + (match["frag"] or "")


# Exception class names (botocore, aiobotocore, aiohttp, builtins) -> what went wrong and the fix.
# Names, not imports: the storage backends are optional and this module must import without them.
# Timeouts first: botocore's ConnectTimeoutError is also an EndpointConnectionError.
_TIMEOUTS = {"ConnectTimeoutError", "ReadTimeoutError", "ServerTimeoutError", "TimeoutError", "ConnectionTimeoutError"}
_NO_CREDENTIALS = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "ProfileNotFound",
    "NoAuthTokenError",
    "UnauthorizedSSOTokenError",
}
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ProxyConnectionError",
    "ClientConnectorError",
    "ClientConnectionError",
    "ServerDisconnectedError",
    "ConnectionRefusedError",
    "ConnectionResetError",
}
_DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
    "403",
    "401",
}
_CREDENTIALS_FIX = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE or a storage profile (--storage-profile)"
)


def storage_error(
    exc: BaseException, location: str | Location, action: str, cls: type[PalstreamError] = PalstreamError
) -> PalstreamError | None:
    """One-line error for a failure of remote storage (S3, HTTP) while doing ``action`` on ``location``.

    Classifies the exception and everything it was raised from (s3fs wraps botocore's errors in
    ``PermissionError``/``FileNotFoundError``; botocore wraps aiohttp's) into: no credentials,
    endpoint unreachable, timeout, access denied, missing bucket, invalid endpoint URL. The URL
    is shown with its credentials redacted. Callers raise the result ``from None``.

    Parameters
    ----------
    exc : BaseException
        What the storage backend raised.
    location : str or Location
        The object being read or written (redacted here before it is shown).
    action : str
        What was being done, as a verb phrase: ``"read input"``, ``"write archive"``, ...
    cls : type of PalstreamError, default PalstreamError
        The error class to return (``InputError`` for inputs, ``ArchiveError`` for archives).

    Returns
    -------
    PalstreamError or None
        The one-line error, or None when ``exc`` is not a remote-storage failure (a local path,
        or an exception this function does not recognise): the caller handles or re-raises it.
    """
    location = Location.of(location)
    if isinstance(exc, PalstreamError) or location.is_local:
        return None
    url = location.url
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 16:
        chain.append(current)
        current = current.__cause__ or current.__context__
    names = {klass.__name__ for error in chain for klass in type(error).__mro__}
    codes = set()
    endpoint = None
    for error in chain:
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            codes.add(str(response.get("Error", {}).get("Code", "")))
            codes.add(str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")))
        status = getattr(error, "status", None)  # aiohttp's HTTP errors (fsspec's http:// and https://)
        if isinstance(status, int):
            codes.add(str(status))
        kwargs = getattr(error, "kwargs", None)
        if isinstance(kwargs, dict) and kwargs.get("endpoint_url"):
            endpoint = _origin(str(kwargs["endpoint_url"]))
    where = location.redacted
    at = f" at {endpoint}" if endpoint else ""
    first = _first_line(exc)
    if names & _TIMEOUTS:
        return cls(
            f"cannot {action} {where}: the storage endpoint{at} timed out; "
            "check the network and --endpoint-url, then retry"
        )
    if names & _NO_CREDENTIALS:
        return cls(f"cannot {action} {where}: no usable storage credentials ({first}); {_CREDENTIALS_FIX}")
    if names & _UNREACHABLE:
        return cls(
            f"cannot {action} {where}: no storage endpoint answers{at}; "
            "check --endpoint-url (or PALSTREAM_S3_ENDPOINT) and that the server is running"
        )
    if "NoSuchBucket" in codes or "NoSuchBucket" in names:
        bucket = url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
        return cls(f"cannot {action} {where}: bucket {bucket} does not exist; check the URL or create the bucket")
    if "InvalidBucketName" in codes:
        return cls(f"cannot {action} {where}: the bucket name is not valid; check the URL")
    if codes & _DENIED_CODES:
        code = min(codes & _DENIED_CODES, key=lambda c: (c.isdigit(), c))  # S3's error code before the HTTP status
        if url.startswith(("http://", "https://")):
            fix = "check the URL's credentials, token or signature (signed URLs expire)"
        else:
            fix = f"check the credentials ({_CREDENTIALS_FIX}) and that they are allowed to {action.split()[0]}"
        return cls(f"cannot {action} {where}: access denied ({code}); {fix}")
    if "ParamValidationError" in names and "bucket name" in first.lower() + str(exc).lower():
        # botocore's text repeats the bucket part of the URL, credentials included: not shown
        return cls(
            f"cannot {action} {where}: the bucket name is not valid; check the URL "
            f"(credentials do not go in it: {_CREDENTIALS_FIX})"
        )
    if "ValueError" in names and "endpoint" in first.lower():
        return cls(f"cannot {action} {where}: {first}; give --endpoint-url as http(s)://host:port")
    return None


def _origin(url: str) -> str:
    """``scheme://host:port`` of an endpoint URL (no path, no credentials)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
