"""palstream: a palette video codec and the batch system that runs it over video libraries."""

__version__ = "0.1.0"
