from enum import IntEnum
from types import ModuleType
from typing import Any, Callable

LAYOUT: dict[str, int]

class CopyOutcome(IntEnum):
    STALE = 0
    OUT_OF_RANGE = 1
    CORRUPT = 2

def check_layout(layout: ModuleType) -> None: ...

def walk(master: Any, section_of: Callable[[int], Any], head: int, h: int, path: bytes,
         slots: int, max_chain: int) -> tuple[int, int, int, Any] | str | None: ...
def copy_out(sec: Any, off: int, path_len: int, size: int, mtime_ns: int, inode: int, dev: int,
             ctime_ns: int,
             into: bytearray | memoryview | None) -> bool | bytes | CopyOutcome: ...
