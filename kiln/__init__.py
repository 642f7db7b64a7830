"""kiln: build a checkpoint into an engine offline, then generate from it fast."""

from kiln.version import __version__

__all__ = ["__version__"]
