# The web cache's shared layout as the native hit path (webcache/_hit.pyx) reads it: the entry
# header fields and refs of webcache/layout.py, which owns the layout. webcache._hit compares
# every constant here with webcache.layout when it is imported and refuses to load on any
# difference (a LayoutMismatchError naming it), so the two cannot drift apart silently.

cdef enum:
    # entry header fields (byte offsets from the entry)
    E_NEXT = 0
    E_HASH = 16
    E_SIZE = 24
    E_MTIME = 32
    E_INODE = 40
    E_DEV = 48
    E_SUM = 56
    E_ACCESS = 64
    E_PATH_LEN = 72
    E_CTIME = 96
    ENTRY_HEADER = 640
    # an arena's entries start here
    ARENA_HEADER = 4096
    # a ref is (slot + 1) << SLOT_SHIFT | offset
    SLOT_SHIFT = 48
    # every entry, field and chain head is 8-byte aligned
    WORD = 8
