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

