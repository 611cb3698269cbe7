"""Errors a user can act on.

Library code raises these with a one-line message that names the problem and the fix;
only the CLI edge turns them into ``exit 1`` (see ``palstream.cli``).
"""


class PalstreamError(Exception):
    """A failure the user can fix; the message is one line naming problem and fix."""


class InputError(PalstreamError):
    """The source video cannot be read or would lose information."""


class ConfigError(PalstreamError, ValueError):
    """An encoder or job setting is out of range."""


class ArchiveError(PalstreamError):
    """An archive is missing, malformed, or cannot be written."""


class DamagedChunkError(ArchiveError):
    """One GOP chunk of an archive fails its checksum or does not parse."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"chunk {index} is damaged: {reason}")
        self.index = index
        self.reason = reason


# Exception class names (botocore, aiobotocore, aiohttp, builtins) -> what went wrong and the fix.
# Names, not imports: the storage backends are optional and this module must stay importable alone.
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
    exc: BaseException, url: str, action: str, cls: type[PalstreamError] = PalstreamError
) -> PalstreamError | None:
    """One-line error for a failure of remote storage (S3, HTTP) while doing ``action`` on ``url``.

    Classifies the exception and everything it was raised from (s3fs wraps botocore's errors in
    ``PermissionError``/``FileNotFoundError``; botocore wraps aiohttp's) into: no credentials,
    endpoint unreachable, timeout, access denied, missing bucket, invalid endpoint URL. The URL
    is shown with its credentials redacted. Callers raise the result ``from None``.

    Parameters
    ----------
    exc : BaseException
        What the storage backend raised.
    url : str
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
    from palstream.io import redact_url  # palstream.io imports this module

    if isinstance(exc, PalstreamError) or "://" not in str(url) or str(url).startswith(("file://", "local://")):
        return None
    chain = []
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
    where = redact_url(str(url))
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
        bucket = str(url).split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
        return cls(f"cannot {action} {where}: bucket {bucket} does not exist; check the URL or create the bucket")
    if "InvalidBucketName" in codes:
        return cls(f"cannot {action} {where}: the bucket name is not valid; check the URL")
    if codes & _DENIED_CODES:
        code = min(codes & _DENIED_CODES, key=lambda c: (c.isdigit(), c))  # S3's error code before the HTTP status
        if str(url).startswith(("http://", "https://")):
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
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
