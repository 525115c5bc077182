"""The cooperative web file cache: several aiohttp node processes share ONE cache of static
files in shared memory (see docs/webcache.md). Run it with ``mcs-webcache serve --root DIR``."""

from webcache.cache import CacheStats, McsWebCache

__all__ = ["CacheStats", "McsWebCache"]
