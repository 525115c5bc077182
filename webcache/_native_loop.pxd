# Declarations of webcache/native_loop.h, the native hit loop (webcache/_native_loop.pyx wraps
# it; webcache/native.py is its policy). Only declarations live here.
from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef extern from "native_loop.h" nogil:
    enum:
        HL_MAX_SLOTS
        HL_SEALED_MAX
        HL_NAME_MAX
        HL_NOT_PLAIN_MAX
        HL_STR_MAX
        HL_MAX_TARGET
        HL_HIT
        HL_REASONS
        HC_COUNT
        HC_ADOPTED
        HC_SERVED
        HC_HITS
        HC_HEADS
        HC_BODY_BYTES
        HC_CLOSED
        HC_TIMEOUT_HEADER
        HC_TIMEOUT_IDLE
        HC_TIMEOUT_SEND
        HC_REPAIRED
        HC_HANDED_OFF
        HC_SEALED_HITS
        HC_SEALED_MADE
        HC_SEALED_DROPPED
        HC_SEALED_FAILED
        HC_SEALED_HELD
        HC_SEALED_BYTES
        HC_REASON0
        HL_NOT_PLAIN
        HL_PARTIAL
        HL_NO_FILE
        HL_MISS
        HL_STALE
        HL_CORRUPT
        HL_RECOVERY
        HL_BUSY
        HL_UNAVAILABLE
        HL_ERROR

    int64_t HL_SEAL_RETRY_NS

    ctypedef struct hl_layout:
        int slots
        uint64_t buckets, buckets_at, bucket_size, b_mutex, b_head
        uint64_t e_next, e_hash, e_size, e_mtime, e_inode, e_dev, e_sum, e_access, e_path_len
        uint64_t e_ctime, e_pins, entry_header, arena_header, a_id, m_ref, m_arena
        uint64_t slot_shift, max_chain, mf_offset

    ctypedef struct hl_config:
        int root_fd
        char prefix[4096]
        size_t prefix_len
        uint64_t max_entry
        uint64_t sealed_budget
        uint64_t sealed_min
        uint64_t sealed_count
        int sealed_dir_fd
        int check_readable
        int64_t header_timeout_ns, keepalive_timeout_ns, send_timeout_ns, sweep_ns, lock_wait_ns
        hl_layout lay
        char not_plain[32][33]
        int n_not_plain
        char node[256]
        char host[256]
        char server[256]
        char default_type[256]

    ctypedef struct hl_shared:
        char* master
        int64_t master_len
        char* root
        int64_t root_len
        char* arena[64]
        int64_t arena_len[64]
        int slot
        uint64_t tag
        uint64_t mark_off
        uint64_t mf_seen

    ctypedef struct hl_handoff:
        int fd
        int reason
        int64_t deadline
        char* data
        size_t len

    ctypedef struct hl_request:
        int head
        int http10
        int keep_alive
        const char* target
        size_t target_len

    ctypedef struct hl_file:
        uint64_t size, mtime_ns, inode, dev, ctime_ns

    ctypedef struct hl_loop:
        int py_fd
        char head[2048]

    hl_loop* hl_new(const hl_config* cfg, int* err)
    int hl_add_type(hl_loop* L, const char* ext, size_t ext_len, const char* type, size_t type_len)
    void hl_types_done(hl_loop* L)
    int hl_run(hl_loop* L)
    void hl_stop(hl_loop* L)
    void hl_drain(hl_loop* L)
    int hl_is_draining(hl_loop* L)
    void hl_free(hl_loop* L)
    int hl_adopt(hl_loop* L, int fd, const char* data, size_t len)
    size_t hl_take(hl_loop* L, hl_handoff* out, size_t max)
    void hl_gate_close(hl_loop* L)
    void hl_gate_open(hl_loop* L)
    int hl_gate_is_closed(hl_loop* L)
    int hl_wait_quiet(hl_loop* L, int64_t timeout_ns)
    void hl_set_shared(hl_loop* L, const hl_shared* sh)
    uint64_t hl_counter(hl_loop* L, int i)
    uint64_t hl_open(hl_loop* L)
    uint64_t hl_path_hash(const unsigned char* data, size_t n)
    int hl_parse(const hl_config* C, const char* head, size_t n, hl_request* rq)
    int hl_plain_target(const char* t, size_t n)
    int hl_seal_file(int dir_fd, const char* data, size_t n)
    size_t hl_response_head(hl_loop* L, const hl_request* rq, const hl_file* f, int64_t now_real_ns)
