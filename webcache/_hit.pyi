from typing import Any, Callable

LAYOUT: dict[str, int]
STALE: int
OUT_OF_RANGE: int
CORRUPT: int

def walk(master: Any, section_of: Callable[[int], Any], head: int, h: int, path: bytes,
         slots: int, max_chain: int) -> tuple[int, int, int, Any] | str | None: ...
def copy_out(sec: Any, off: int, path_len: int, size: int, mtime_ns: int, inode: int, dev: int,
             ctime_ns: int,
             into: bytearray | memoryview | None) -> bool | bytes | int: ...
