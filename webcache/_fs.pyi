RESOLVE_NO_MAGICLINKS: int
RESOLVE_NO_SYMLINKS: int
RESOLVE_BENEATH: int

def openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int: ...
def stat_beneath(dirfd: int,
                 path: bytes) -> tuple[int, int, int, int, int, int, int, int, bool]: ...
