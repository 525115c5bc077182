/* The native hit loop of a web cache node: one thread with its own epoll set that serves plain
 * GET/HEAD requests for cached files straight from shared memory, never taking the GIL, and
 * hands every other request (with the bytes read so far) to the node's asyncio side.
 *
 * Mechanism only. What is served and how is decided in Python and given at creation
 * (webcache/native.py, webcache/_native_loop.pyx): the layout offsets, the deadlines, the
 * request headers that are not plain, the media types, the header values. This file
 * reproduces the asyncio fast path (webcache/fastpath.py: FastPath.plain_file,
 * Connection._serve) for the requests it serves, and hands off the rest:
 *
 *   epoll -> read -> parse the head strictly -> fstatat(AT_SYMLINK_NOFOLLOW) of a one-name
 *   target, openat2(O_PATH, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) + fstat of a longer one ->
 *   [GET] enter the gate, lock the bucket, walk its chain, mark the pin journal, pin, unlock,
 *   check size/mtime/inode/dev/ctime, copy out summing the copy, unpin, compare the sum, leave
 *   the gate -> sendmsg(header, copy).
 *
 * Sealed copies: a body of at least ``sealed_min`` bytes asked for a second time is kept in a
 * memfd of the loop's own, written from the verified copy and then sealed (F_SEAL_WRITE: the
 * kernel refuses every later change, by anyone). Its next hits check the entry under the bucket
 * lock as above (same version, same stored checksum: the copy was verified against exactly that
 * sum) and send the memfd with sendfile, which gives the socket the memfd's pages instead of
 * copying them: no copy and no checksum pass per response, and what the client reads can never
 * differ from what was verified. At most ``sealed_budget`` bytes and ``sealed_count`` copies
 * (descriptors); the least recently used goes first. With ``sealed_dir_fd``, a copy is an
 * unnamed read-only file in that directory instead (hl_seal_file): the page cache of a
 * filesystem that keeps files in large folios (ext4 since Linux 6.16, XFS) gives the socket a
 * 64 KiB body as one piece instead of sixteen pages.
 *
 * The gate: ``inside`` is raised before the gate word is read (seq_cst both), the recovery
 * closes the gate before it reads ``inside`` (webcache.cache: workers_quiet), so either the
 * loop sees the gate closed and touches nothing shared, or the recovery waits for it to leave.
 * A hit whose block saw a recovery requested or a memory failure counted is dropped (handed
 * off), as a Python block raises Recovering at its end. Sections are read through pointers
 * that Python refreshes only while the gate is closed and the loop is out (hl_set_shared). */
#ifndef MCS_NATIVE_LOOP_H
#define MCS_NATIVE_LOOP_H

#include "gsm_native.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>

#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef SYS_faccessat2
#define SYS_faccessat2 439
#endif
#define HL_RESOLVE_NO_MAGICLINKS 0x02ULL
#define HL_RESOLVE_NO_SYMLINKS 0x04ULL
#define HL_RESOLVE_BENEATH 0x08ULL

#define HL_MAX_SLOTS 64
#define HL_MAX_HEAD 8192      /* a longer head is aiohttp's to refuse (fastpath.MAX_HEAD) */
#define HL_MAX_TARGET 1024    /* fastpath.MAX_TARGET */
#define HL_READ_SIZE 65536
#define HL_RESPONSE_HEAD 2048 /* room for the status line and headers of one response */
#define HL_EVENTS 64
#define HL_TURN 32            /* requests one connection gets answered per turn (then the others') */
#define HL_NAME_MAX 32        /* request header names compared (longer ones are none of ours) */
#define HL_NOT_PLAIN_MAX 32
#define HL_STR_MAX 256
#define HL_KEYS 1024          /* memoized cache-key hashes (direct-mapped by target) */
#define HL_KEY_MAX 120        /* longer targets are hashed every time */
#define HL_DATES 16           /* memoized Last-Modified values (direct-mapped by second) */
#define HL_SEALED_MAX 256     /* sealed copies (and candidates) a loop keeps at most */
#define HL_SEAL_RETRY_NS 1000000000LL  /* after a copy failed, none is tried for this long */
#define HL_LINGER_NS 5000000000LL      /* a lingering close reads and drops input this long at most */
#define HL_SEALED_WAYS 4      /* places a body's hash may take in the table */

/* Why a request went to the asyncio side (webcache.native.HandOff mirrors these). */
enum {
    HL_NOT_PLAIN = 0,  /* a complete head the native path does not serve (method, target, headers) */
    HL_PARTIAL,        /* an incomplete head once the socket had no more, or one over MAX_HEAD */
    HL_NO_FILE,        /* the target is not a regular readable file of cacheable size */
    HL_MISS,           /* not cached */
    HL_STALE,          /* cached for another version of the file */
    HL_CORRUPT,        /* checksum mismatch, an entry out of range, a corrupt chain */
    HL_RECOVERY,       /* the gate is closed, or a memory failure was counted */
    HL_BUSY,           /* the bucket lock was not taken in time */
    HL_UNAVAILABLE,    /* an arena or mutex this loop cannot use (not mapped, bad magic) */
    HL_ERROR,          /* an unexpected system error */
    HL_REASONS
};
#define HL_HIT (-1)

/* Counters (one writer: the loop thread; read by Python at any time). */
enum {
    HC_ADOPTED = 0, HC_SERVED, HC_HITS, HC_HEADS, HC_BODY_BYTES, HC_CLOSED,
    HC_TIMEOUT_HEADER, HC_TIMEOUT_IDLE, HC_TIMEOUT_SEND, HC_REPAIRED, HC_HANDED_OFF,
    HC_SEALED_HITS,    /* responses sent from a sealed copy */
    HC_SEALED_MADE,    /* sealed copies made */
    HC_SEALED_DROPPED, /* sealed copies dropped (replaced, over the budget, out of date) */
    HC_SEALED_FAILED,  /* sealed copies that could not be made (memfd, memory, descriptors) */
    HC_SEALED_HELD, HC_SEALED_BYTES,  /* gauges: copies held now and their bytes */
    HC_REASON0, HC_COUNT = HC_REASON0 + HL_REASONS
};

typedef struct {
    int slots;            /* member slots (<= HL_MAX_SLOTS) */
    uint64_t buckets, buckets_at, bucket_size, b_mutex, b_head;
    uint64_t e_next, e_hash, e_size, e_mtime, e_inode, e_dev, e_sum, e_access, e_path_len;
    uint64_t e_ctime, e_pins, entry_header, arena_header, a_id, m_ref, m_arena;
    uint64_t slot_shift, max_chain, mf_offset;
} hl_layout;

typedef struct {
    int root_fd;                     /* the document root (O_PATH), the loop's own */
    char prefix[4096];               /* the canonical root path and "/" (the cache key's start) */
    size_t prefix_len;
    uint64_t max_entry;
    uint64_t sealed_budget;          /* bytes of sealed copies at most (0: none are made) */
    uint64_t sealed_min;             /* the smallest body given a sealed copy */
    uint64_t sealed_count;           /* sealed copies (descriptors) at most, <= HL_SEALED_MAX */
    int sealed_dir_fd;               /* -1: copies are sealed memfds; else a directory (O_PATH,
                                      * the loop's own) for unnamed read-only files */
    int check_readable;              /* access(R_OK) of every file (GET too) */
    int64_t header_timeout_ns, keepalive_timeout_ns, send_timeout_ns, sweep_ns, lock_wait_ns;
    hl_layout lay;
    char not_plain[HL_NOT_PLAIN_MAX][HL_NAME_MAX + 1];  /* lowercase header names */
    int n_not_plain;
    char node[HL_STR_MAX], host[HL_STR_MAX], server[HL_STR_MAX], default_type[HL_STR_MAX];
} hl_config;

typedef struct {                     /* the shared memory the loop reads (hl_set_shared) */
    char *master; int64_t master_len;
    char *root; int64_t root_len;
    char *arena[HL_MAX_SLOTS]; int64_t arena_len[HL_MAX_SLOTS];
    int slot;                        /* this member's slot (its pin counter, its journal) */
    uint64_t tag;                    /* recorded next to a bucket mutex while held */
    uint64_t mark_off;               /* the loop's own pin journal mark in the master area */
    uint64_t mf_seen;                /* the memory-failure count the component has seen */
} hl_shared;

typedef struct { char ext[HL_NAME_MAX + 1]; char *type; size_t type_len; } hl_type;

/* A connection between the loop and Python; ``deadline``: for a first head handed over
 * partial, its header deadline (CLOCK_MONOTONIC ns, from accept), else 0. */
typedef struct { int fd; int reason; char *data; size_t len; int64_t deadline; } hl_handoff;

typedef struct { uint32_t len; char rel[HL_KEY_MAX]; uint64_t hash; } hl_key;

typedef struct { int64_t sec; uint32_t len; char text[36]; } hl_date_memo;

/* A body of the cache in a sealed memfd of the loop's own (or a candidate: fd -1, seen once).
 * It stands for the entries whose key hash, version and stored checksum are these: the copy
 * was summed as it was made and matched ``sum``. */
typedef struct {
    int taken;                       /* 0: an empty place */
    int fd;                          /* the sealed memfd; -1: a candidate (asked for once) */
    uint64_t hash, size, mtime_ns, inode, dev, ctime_ns, sum;
    int64_t used;                    /* L->now when last asked for */
} hl_sealed;

enum { HL_FRESH = 0, HL_IDLE, HL_SENDING, HL_LINGER };

typedef struct hl_conn {
    int fd;
    int phase;
    int close_after;                 /* close once the pending output is sent */
    int64_t deadline;                /* FRESH (header_timeout), IDLE (keepalive_timeout), LINGER */
    char *in; size_t in_len, in_cap; /* bytes received and not consumed yet */
    char *out; size_t out_len, out_off;  /* output the socket did not take */
    size_t stall_left; int64_t stall_since;
    struct hl_conn *prev, *next;
    struct hl_conn *pprev, *pnext;   /* in L->posted while it has a turn to come (posted) */
    int posted;
} hl_conn;

typedef struct {
    hl_config cfg;
    int epfd, wake_fd, py_fd;
    int stop;
    int draining;                    /* 1 once the node stops: each connection closes when idle */
    uint32_t gate_closed;            /* mirrors the component's gate (1: closed) */
    uint32_t inside;                 /* 1 while the loop reads shared memory */
    hl_shared sh;
    pthread_mutex_t qlock;
    hl_handoff *adopt_q; size_t adopt_n, adopt_cap;
    hl_handoff *hand_q; size_t hand_n, hand_cap;
    uint64_t open;                   /* queued adoptions + connections + queued hand-offs */
    hl_conn conns;                   /* list head */
    hl_conn posted;                  /* head: connections whose complete requests wait a turn */
    int turn;                        /* requests the connection served now may still answer */
    char *rbuf;
    char *scratch; size_t scratch_cap;
    char head[HL_RESPONSE_HEAD];
    int64_t date_sec; char date[64]; size_t date_len;
    hl_date_memo last_modified[HL_DATES];
    hl_key *keys;
    hl_sealed *sealed;               /* HL_SEALED_MAX places (NULL: sealed copies off) */
    int64_t seal_retry_at;           /* no copy is made before (a full disk, no descriptor) */
    hl_type *types; size_t n_types, types_cap;
    int64_t now, now_real, next_sweep;  /* CLOCK_MONOTONIC, CLOCK_REALTIME: per wake-up */
    uint64_t counters[HC_COUNT];
} hl_loop;

/* -- small helpers ------------------------------------------------------------------------- */

static inline void hl_count(hl_loop *L, int i, uint64_t n) {
    __atomic_store_n(&L->counters[i], __atomic_load_n(&L->counters[i], __ATOMIC_RELAXED) + n,
                     __ATOMIC_RELAXED);
}

static inline uint64_t hl_counter(hl_loop *L, int i) {
    return (i >= 0 && i < HC_COUNT) ? __atomic_load_n(&L->counters[i], __ATOMIC_RELAXED) : 0;
}

static inline uint64_t hl_open(hl_loop *L) { return __atomic_load_n(&L->open, __ATOMIC_RELAXED); }

static inline void hl_open_add(hl_loop *L, int64_t d) {
    __atomic_fetch_add(&L->open, (uint64_t)d, __ATOMIC_RELAXED);
}

static inline int64_t hl_mono(void) { return mcs_now_ns(CLOCK_MONOTONIC); }

static inline void hl_poke(int fd) {
    uint64_t one = 1;
    ssize_t rc;
    do rc = write(fd, &one, sizeof one); while (rc < 0 && errno == EINTR);
}

static inline void hl_drain_fd(int fd) {
    uint64_t v;
    ssize_t rc;
    do rc = read(fd, &v, sizeof v); while (rc < 0 && errno == EINTR);
}

static inline char hl_lower(char ch) { return (ch >= 'A' && ch <= 'Z') ? (char)(ch + 32) : ch; }

static inline int hl_eq(const char *a, size_t n, const char *lit) {
    size_t m = strlen(lit);
    return n == m && memcmp(a, lit, n) == 0;
}

static inline void hl_put(char **p, const char *s, size_t n) { memcpy(*p, s, n); *p += n; }
#define HL_PUTS(p, lit) hl_put((p), (lit), sizeof(lit) - 1)

static inline void hl_hex(char **p, uint64_t v) {
    char tmp[16];
    int n = 0;
    do { tmp[n++] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    while (n) *(*p)++ = tmp[--n];
}

static inline void hl_dec(char **p, uint64_t v) {
    char tmp[20];
    int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) *(*p)++ = tmp[--n];
}

static inline void hl_two(char **p, int v) { *(*p)++ = (char)('0' + v / 10); *(*p)++ = (char)('0' + v % 10); }

#define HL_MAX_HTTP_SECONDS 253402300799LL /* 9999-12-31T23:59:59Z (semantics.MAX_HTTP_SECONDS) */

/* IMF-fixdate, as email.utils.formatdate(seconds, usegmt=True) writes it. */
static size_t hl_http_date(char *out, int64_t seconds) {
    static const char *days = "SunMonTueWedThuFriSat";
    static const char *months = "JanFebMarAprMayJunJulAugSepOctNovDec";
    struct tm tm;
    time_t t = (time_t)(seconds < 0 ? 0 : seconds > HL_MAX_HTTP_SECONDS ? HL_MAX_HTTP_SECONDS : seconds);
    char *p = out;
    gmtime_r(&t, &tm);
    hl_put(&p, days + 3 * tm.tm_wday, 3);
    HL_PUTS(&p, ", ");
    hl_two(&p, tm.tm_mday);
    *p++ = ' ';
    hl_put(&p, months + 3 * tm.tm_mon, 3);
    *p++ = ' ';
    int year = tm.tm_year + 1900;
    hl_two(&p, year / 100);
    hl_two(&p, year % 100);
    *p++ = ' ';
    hl_two(&p, tm.tm_hour);
    *p++ = ':';
    hl_two(&p, tm.tm_min);
    *p++ = ':';
    hl_two(&p, tm.tm_sec);
    HL_PUTS(&p, " GMT");
    return (size_t)(p - out);
}

/* -- the cache key's hash: BLAKE2b with an 8-byte digest (webcache.cache.path_hash) ------------ */

static const uint64_t HL_B2_IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};
static const uint8_t HL_B2_SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

static inline uint64_t hl_rotr(uint64_t x, int r) { return (x >> r) | (x << (64 - r)); }

#define HL_B2_G(a, b, c, d, x, y) do {                       \
        a = a + b + (x); d = hl_rotr(d ^ a, 32);             \
        c = c + d; b = hl_rotr(b ^ c, 24);                   \
        a = a + b + (y); d = hl_rotr(d ^ a, 16);             \
        c = c + d; b = hl_rotr(b ^ c, 63);                   \
    } while (0)

static void hl_b2_compress(uint64_t h[8], const unsigned char block[128], uint64_t t, int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) memcpy(&m[i], block + 8 * i, 8);  /* little-endian hosts */
    for (int i = 0; i < 8; i++) { v[i] = h[i]; v[i + 8] = HL_B2_IV[i]; }
    v[12] ^= t;
    if (last) v[14] = ~v[14];
    for (int r = 0; r < 12; r++) {
        const uint8_t *s = HL_B2_SIGMA[r];
        HL_B2_G(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
        HL_B2_G(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
        HL_B2_G(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
        HL_B2_G(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
        HL_B2_G(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
        HL_B2_G(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
        HL_B2_G(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
        HL_B2_G(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* int.from_bytes(blake2b(data, digest_size=8).digest(), "little") */
static uint64_t hl_path_hash(const unsigned char *data, size_t n) {
    uint64_t h[8];
    unsigned char block[128];
    uint64_t t = 0;
    for (int i = 0; i < 8; i++) h[i] = HL_B2_IV[i];
    h[0] ^= 0x01010000ULL ^ 8;  /* digest length 8, no key, fanout 1, depth 1 */
    while (n > 128) {
        t += 128;
        hl_b2_compress(h, data, t, 0);
        data += 128;
        n -= 128;
    }
    memset(block, 0, sizeof block);
    memcpy(block, data, n);
    t += n;
    hl_b2_compress(h, block, t, 1);
    return h[0];
}

/* The hash of the cache key prefix + rel, memoized by rel (a key is looked up on every hit). */
static uint64_t hl_key_hash(hl_loop *L, const char *key, size_t n, size_t prefix_len) {
    const char *rel = key + prefix_len;
    size_t rn = n - prefix_len;
    if (rn > HL_KEY_MAX)
        return hl_path_hash((const unsigned char *)key, n);
    uint32_t f = 2166136261u;  /* FNV-1a: only picks the slot */
    for (size_t i = 0; i < rn; i++) f = (f ^ (unsigned char)rel[i]) * 16777619u;
    hl_key *k = &L->keys[f & (HL_KEYS - 1)];
    if (k->len == rn && memcmp(k->rel, rel, rn) == 0)
        return k->hash;
    k->hash = hl_path_hash((const unsigned char *)key, n);
    memcpy(k->rel, rel, rn);
    k->len = (uint32_t)rn;
    return k->hash;
}

/* -- creation and configuration ------------------------------------------------------------- */

static void hl_free(hl_loop *L);

static hl_loop *hl_new(const hl_config *cfg, int *err) {
    hl_loop *L = (hl_loop *)calloc(1, sizeof(hl_loop));
    struct epoll_event ev;
    if (!L) { *err = ENOMEM; return NULL; }
    L->cfg = *cfg;
    L->epfd = L->wake_fd = L->py_fd = -1;
    L->gate_closed = 1;
    L->conns.next = L->conns.prev = &L->conns;
    L->posted.pnext = L->posted.pprev = &L->posted;
    pthread_mutex_init(&L->qlock, NULL);
    L->date_sec = -1;
    L->scratch_cap = cfg->max_entry ? (size_t)cfg->max_entry : 1;
    L->rbuf = (char *)malloc(HL_READ_SIZE);
    L->scratch = (char *)malloc(L->scratch_cap);
    L->keys = (hl_key *)calloc(HL_KEYS, sizeof(hl_key));
    if (!L->rbuf || !L->scratch || !L->keys) { *err = ENOMEM; goto fail; }
    if (cfg->sealed_budget && cfg->sealed_count) {
        L->sealed = (hl_sealed *)calloc(HL_SEALED_MAX, sizeof(hl_sealed));
        if (!L->sealed) { *err = ENOMEM; goto fail; }
        for (int i = 0; i < HL_SEALED_MAX; i++) L->sealed[i].fd = -1;
    }
    for (int i = 0; i < HL_DATES; i++) L->last_modified[i].sec = -1;
    L->epfd = epoll_create1(EPOLL_CLOEXEC);
    L->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    L->py_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (L->epfd < 0 || L->wake_fd < 0 || L->py_fd < 0) { *err = errno; goto fail; }
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.ptr = NULL;  /* the wake-up descriptor */
    if (epoll_ctl(L->epfd, EPOLL_CTL_ADD, L->wake_fd, &ev) < 0) { *err = errno; goto fail; }
    *err = 0;
    return L;
fail:
    hl_free(L);  /* what was made so far (the rest is NULL, -1 or empty) */
    return NULL;
}

static int hl_type_cmp(const void *a, const void *b) {
    return strcmp(((const hl_type *)a)->ext, ((const hl_type *)b)->ext);
}

/* One media type: ``ext`` lowercase with its dot. Call hl_types_done() after the last. */
static int hl_add_type(hl_loop *L, const char *ext, size_t ext_len, const char *type, size_t type_len) {
    if (ext_len > HL_NAME_MAX || type_len >= HL_STR_MAX)
        return 0;  /* such an extension never matches a plain target's: left out */
    if (L->n_types == L->types_cap) {
        size_t cap = L->types_cap ? 2 * L->types_cap : 256;
        hl_type *t = (hl_type *)realloc(L->types, cap * sizeof(hl_type));
        if (!t) return ENOMEM;
        L->types = t;
        L->types_cap = cap;
    }
    hl_type *t = &L->types[L->n_types];
    t->type = (char *)malloc(type_len + 1);
    if (!t->type) return ENOMEM;
    memcpy(t->ext, ext, ext_len);
    t->ext[ext_len] = 0;
    memcpy(t->type, type, type_len);
    t->type[type_len] = 0;
    t->type_len = type_len;
    L->n_types++;
    return 0;
}

static void hl_types_done(hl_loop *L) {
    if (L->n_types)
        qsort(L->types, L->n_types, sizeof(hl_type), hl_type_cmp);
}

/* The Content-Type of the last segment ``name`` (webcache.semantics.content_type). */
static void hl_content_type(hl_loop *L, const char *name, size_t n, const char **type, size_t *len) {
    const char *dot = NULL;
    hl_type key;
    for (size_t i = n; i > 0; i--)
        if (name[i - 1] == '.') { dot = name + i - 1; break; }
    *type = L->cfg.default_type;
    *len = strlen(L->cfg.default_type);
    if (dot == NULL || dot == name || (size_t)(name + n - dot) > HL_NAME_MAX || !L->n_types)
        return;
    size_t m = (size_t)(name + n - dot);
    for (size_t i = 0; i < m; i++) key.ext[i] = hl_lower(dot[i]);
    key.ext[m] = 0;
    hl_type *found = (hl_type *)bsearch(&key, L->types, L->n_types, sizeof(hl_type), hl_type_cmp);
    if (found) { *type = found->type; *len = found->type_len; }
}

/* -- the gate -------------------------------------------------------------------------------- */

static inline void hl_leave(hl_loop *L) {
    __atomic_store_n(&L->inside, 0, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&L->gate_closed, __ATOMIC_SEQ_CST))
        syscall(SYS_futex, &L->inside, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static inline int hl_enter(hl_loop *L) {
    __atomic_store_n(&L->inside, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&L->gate_closed, __ATOMIC_SEQ_CST)) {
        hl_leave(L);
        return 0;
    }
    return 1;
}

static inline int hl_gate_is_closed(hl_loop *L) {
    return __atomic_load_n(&L->gate_closed, __ATOMIC_SEQ_CST) != 0;
}

static void hl_gate_close(hl_loop *L) { __atomic_store_n(&L->gate_closed, 1, __ATOMIC_SEQ_CST); }

/* Only after hl_set_shared, with the gate closed and the loop out (hl_wait_quiet). */
static void hl_gate_open(hl_loop *L) { __atomic_store_n(&L->gate_closed, 0, __ATOMIC_SEQ_CST); }

/* Wait up to timeout_ns for the loop to be out of shared memory; 1 once it is. Call after
 * hl_gate_close: it cannot enter again then. */
static int hl_wait_quiet(hl_loop *L, int64_t timeout_ns) {
    int64_t until = hl_mono() + timeout_ns;
    while (__atomic_load_n(&L->inside, __ATOMIC_SEQ_CST)) {
        int64_t left = until - hl_mono();
        struct timespec ts;
        if (left <= 0) return 0;
        mcs_deadline(left, &ts);
        syscall(SYS_futex, &L->inside, FUTEX_WAIT_PRIVATE, 1, &ts, NULL, 0);
    }
    return 1;
}

/* Only while the gate is closed and the loop is out (or before it runs). */
static void hl_set_shared(hl_loop *L, const hl_shared *sh) { L->sh = *sh; }

/* -- queues between the loop and Python --------------------------------------------------------- */

/* Any thread: give the loop an accepted, non-blocking socket (it owns it from now on), with
 * the ``len`` bytes already received from it (a connection the asyncio side gives back). */
static int hl_adopt(hl_loop *L, int fd, const char *data, size_t len) {
    char *copy = NULL;
    if (len) {
        copy = (char *)malloc(len);
        if (!copy) return ENOMEM;
        memcpy(copy, data, len);
    }
    pthread_mutex_lock(&L->qlock);
    if (L->adopt_n == L->adopt_cap) {
        size_t cap = L->adopt_cap ? 2 * L->adopt_cap : 64;
        hl_handoff *q = (hl_handoff *)realloc(L->adopt_q, cap * sizeof(hl_handoff));
        if (!q) { pthread_mutex_unlock(&L->qlock); free(copy); return ENOMEM; }
        L->adopt_q = q;
        L->adopt_cap = cap;
    }
    hl_handoff *a = &L->adopt_q[L->adopt_n++];
    a->fd = fd;
    a->reason = 0;
    a->data = copy;
    a->len = len;
    a->deadline = 0;
    hl_open_add(L, 1);
    pthread_mutex_unlock(&L->qlock);
    hl_poke(L->wake_fd);
    return 0;
}

/* Python: take up to ``max`` hand-offs (their descriptors and data are the caller's now). */
static size_t hl_take(hl_loop *L, hl_handoff *out, size_t max) {
    size_t n;
    hl_drain_fd(L->py_fd);
    pthread_mutex_lock(&L->qlock);
    n = L->hand_n < max ? L->hand_n : max;
    memcpy(out, L->hand_q, n * sizeof(hl_handoff));
    memmove(L->hand_q, L->hand_q + n, (L->hand_n - n) * sizeof(hl_handoff));
    L->hand_n -= n;
    hl_open_add(L, -(int64_t)n);
    if (L->hand_n)
        hl_poke(L->py_fd);  /* more left: call again */
    pthread_mutex_unlock(&L->qlock);
    return n;
}

static void hl_stop(hl_loop *L) {
    __atomic_store_n(&L->stop, 1, __ATOMIC_SEQ_CST);
    hl_poke(L->wake_fd);
}

/* Any thread: the node is stopping. From now on every response says ``Connection: close`` and
 * its connection is closed once it is sent; a connection with no request in progress is closed
 * at the loop's next wake-up (hl_close_idle). The loop keeps running until hl_stop. */
static void hl_drain(hl_loop *L) {
    __atomic_store_n(&L->draining, 1, __ATOMIC_SEQ_CST);
    hl_poke(L->wake_fd);
}

static inline int hl_is_draining(hl_loop *L) { return __atomic_load_n(&L->draining, __ATOMIC_RELAXED); }

/* -- connections ------------------------------------------------------------------------------ */

/* Fairness: a connection that used its turn (HL_TURN requests) with requests still buffered
 * waits in L->posted while the others' events are handled; the loop gives it its next turn
 * without sleeping (hl_run_posted). A client that pipelines without end cannot hold the loop. */
static void hl_post(hl_loop *L, hl_conn *c) {
    if (c->posted) return;
    c->posted = 1;
    c->pnext = &L->posted;
    c->pprev = L->posted.pprev;
    L->posted.pprev->pnext = c;
    L->posted.pprev = c;
}

static void hl_unpost(hl_conn *c) {
    if (!c->posted) return;
    c->pprev->pnext = c->pnext;
    c->pnext->pprev = c->pprev;
    c->posted = 0;
}

static void hl_unlink(hl_loop *L, hl_conn *c) {
    hl_unpost(c);
    c->prev->next = c->next;
    c->next->prev = c->prev;
    free(c->in);
    free(c->out);
    free(c);
    hl_open_add(L, -1);
}

static void hl_close(hl_loop *L, hl_conn *c) {
    /* Out of the epoll set first: closing the descriptor is not enough while another one for
     * the same socket is open (a connection given back by the asyncio side is a dup of a
     * descriptor that side closes a moment later), and an event would name a freed c. */
    epoll_ctl(L->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    hl_count(L, HC_CLOSED, 1);
    hl_unlink(L, c);
}

static int hl_watch(hl_loop *L, hl_conn *c, int op, uint32_t events) {
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = events;
    ev.data.ptr = c;
    return epoll_ctl(L->epfd, op, c->fd, &ev);
}

/* Whether a byte from the client waits in the socket (0 too at its end or on an error). */
static inline int hl_input_waiting(hl_conn *c) {
    char b;
    return recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) > 0;
}

/* The last response of a connection is given to the socket: close it. While the client has
 * not received all of it, input that it sends (or sent) would make the kernel of a closed
 * socket answer with a reset, which drops what of the response is still on its way; so then it
 * is a lingering close (RFC 9112 9.6, nginx's lingering_close): our side is shut down (the
 * response ends with a FIN), the client's input is read and dropped until it closes too,
 * HL_LINGER_NS at most (hl_sweep). */
static void hl_finish(hl_loop *L, hl_conn *c, int dropped) {
    int unacked = 0;
    c->in_len = 0;
    if (!dropped && ioctl(c->fd, TIOCOUTQ, &unacked) == 0 && unacked == 0
            && !hl_input_waiting(c)) {
        hl_close(L, c);  /* all of it received, no input waiting (or the client is gone) */
        return;
    }
    if (shutdown(c->fd, SHUT_WR) < 0 || hl_watch(L, c, EPOLL_CTL_MOD, EPOLLIN) < 0) {
        hl_close(L, c);
        return;
    }
    c->phase = HL_LINGER;
    c->deadline = L->now + HL_LINGER_NS;
}

/* A lingering connection is readable: drop its input; close it at its end (or an error). */
static void hl_discard(hl_loop *L, hl_conn *c) {
    for (;;) {
        ssize_t n = recv(c->fd, L->rbuf, HL_READ_SIZE, MSG_DONTWAIT);
        if (n > 0) continue;
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        hl_close(L, c);
        return;
    }
}

/* Give the connection, with ``data`` (the bytes received and not answered), to Python. */
static void hl_hand_off(hl_loop *L, hl_conn *c, int reason, const char *data, size_t len) {
    char *copy = NULL;
    epoll_ctl(L->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    if (len) {
        copy = (char *)malloc(len);
        if (!copy) { hl_count(L, HC_REASON0 + HL_ERROR, 1); hl_close(L, c); return; }
        memcpy(copy, data, len);
    }
    pthread_mutex_lock(&L->qlock);
    if (L->hand_n == L->hand_cap) {
        size_t cap = L->hand_cap ? 2 * L->hand_cap : 64;
        hl_handoff *q = (hl_handoff *)realloc(L->hand_q, cap * sizeof(hl_handoff));
        if (!q) {
            pthread_mutex_unlock(&L->qlock);
            free(copy);
            hl_count(L, HC_REASON0 + HL_ERROR, 1);
            hl_close(L, c);
            return;
        }
        L->hand_q = q;
        L->hand_cap = cap;
    }
    hl_handoff *h = &L->hand_q[L->hand_n++];
    h->fd = c->fd;
    h->reason = reason;
    h->data = copy;
    h->len = len;
    h->deadline = c->phase == HL_FRESH ? c->deadline : 0;  /* the first head: from accept */
    hl_open_add(L, 1);  /* counted until Python takes it */
    pthread_mutex_unlock(&L->qlock);
    hl_count(L, HC_HANDED_OFF, 1);
    hl_count(L, HC_REASON0 + reason, 1);
    hl_unlink(L, c);
    hl_poke(L->py_fd);
}

/* -- one request ------------------------------------------------------------------------------ */

typedef struct {
    uint64_t size, mtime_ns, inode, dev, ctime_ns;
} hl_file;

/* What a head asks for, when it is a plain GET/HEAD (webcache.fastpath.plain_request). */
typedef struct {
    int head;        /* HEAD (else GET) */
    int http10;      /* HTTP/1.0 (else 1.1) */
    int keep_alive;
    const char *target;
    size_t target_len;
} hl_request;

/* Parse a complete head (without its blank line). HL_HIT when plain, else HL_NOT_PLAIN. */
static int hl_parse(const hl_config *C, const char *head, size_t n, hl_request *rq) {
    size_t i = 0;
    /* No control byte but HTAB outside CRLF pairs, no obs-fold. */
    while (i < n) {
        unsigned char b = (unsigned char)head[i];
        if (b == '\r' && i + 1 < n && head[i + 1] == '\n') {
            if (i + 2 < n && (head[i + 2] == ' ' || head[i + 2] == '\t'))
                return HL_NOT_PLAIN;
            i += 2;
            continue;
        }
        if ((b < 0x20 && b != '\t') || b == 0x7f)
            return HL_NOT_PLAIN;
        i++;
    }
    const char *end = head + n;
    const char *eol = (const char *)memmem(head, n, "\r\n", 2);
    const char *line_end = eol ? eol : end;
    const char *sp1 = (const char *)memchr(head, ' ', (size_t)(line_end - head));
    if (!sp1) return HL_NOT_PLAIN;
    const char *sp2 = (const char *)memchr(sp1 + 1, ' ', (size_t)(line_end - sp1 - 1));
    if (!sp2 || memchr(sp2 + 1, ' ', (size_t)(line_end - sp2 - 1))) return HL_NOT_PLAIN;
    size_t mlen = (size_t)(sp1 - head), vlen = (size_t)(line_end - sp2 - 1);
    if (hl_eq(head, mlen, "GET")) rq->head = 0;
    else if (hl_eq(head, mlen, "HEAD")) rq->head = 1;
    else return HL_NOT_PLAIN;
    if (hl_eq(sp2 + 1, vlen, "HTTP/1.1")) rq->http10 = 0;
    else if (hl_eq(sp2 + 1, vlen, "HTTP/1.0")) rq->http10 = 1;
    else return HL_NOT_PLAIN;
    rq->target = sp1 + 1;
    rq->target_len = (size_t)(sp2 - sp1 - 1);
    rq->keep_alive = !rq->http10;
    int hosts = 0, close = 0;  /* "close" wins over "keep-alive", in any order (RFC 9112 9.3) */
    const char *p = eol ? eol + 2 : end;
    while (p < end) {
        const char *le = (const char *)memmem(p, (size_t)(end - p), "\r\n", 2);
        if (!le) le = end;
        const char *colon = (const char *)memchr(p, ':', (size_t)(le - p));
        if (!colon || colon == p) return HL_NOT_PLAIN;
        size_t nlen = (size_t)(colon - p);
        if (memchr(p, ' ', nlen) || memchr(p, '\t', nlen)) return HL_NOT_PLAIN;
        if (nlen <= HL_NAME_MAX) {
            char name[HL_NAME_MAX + 1];
            for (size_t k = 0; k < nlen; k++) name[k] = hl_lower(p[k]);
            name[nlen] = 0;
            const char *v = colon + 1;
            size_t vl = (size_t)(le - v);
            if (hl_eq(name, nlen, "host")) {
                hosts++;
            } else if (hl_eq(name, nlen, "connection")) {
                const char *t = v, *vend = v + vl;
                for (;;) {  /* comma-separated tokens, OWS stripped, case-insensitive */
                    const char *comma = (const char *)memchr(t, ',', (size_t)(vend - t));
                    const char *te = comma ? comma : vend;
                    const char *a = t, *z = te;
                    while (a < z && (*a == ' ' || *a == '\t')) a++;
                    while (z > a && (z[-1] == ' ' || z[-1] == '\t')) z--;
                    char tok[11];
                    size_t tl = (size_t)(z - a);
                    if (tl > 10) return HL_NOT_PLAIN;
                    for (size_t k = 0; k < tl; k++) tok[k] = hl_lower(a[k]);
                    if (hl_eq(tok, tl, "close")) close = 1;
                    else if (hl_eq(tok, tl, "keep-alive")) rq->keep_alive = rq->keep_alive || rq->http10;
                    else return HL_NOT_PLAIN;
                    if (!comma) break;
                    t = comma + 1;
                }
            } else if (hl_eq(name, nlen, "content-length")) {
                const char *a = v, *z = v + vl;
                while (a < z && (*a == ' ' || *a == '\t')) a++;
                while (z > a && (z[-1] == ' ' || z[-1] == '\t')) z--;
                if (z - a != 1 || *a != '0') return HL_NOT_PLAIN;
            } else {
                for (int k = 0; k < C->n_not_plain; k++)
                    if (strcmp(name, C->not_plain[k]) == 0) return HL_NOT_PLAIN;
            }
        }
        p = le + 2;
    }
    if ((hosts != 1 && !rq->http10) || hosts > 1) return HL_NOT_PLAIN;
    if (close) rq->keep_alive = 0;
    return HL_HIT;
}

static inline int hl_first_ok(char ch) {
    return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9')
        || ch == '_' || ch == '~' || ch == '-';
}

/* A target the native path may serve (webcache.fastpath.FastPath.plain_file, before the stat):
 * /[A-Za-z0-9_~-][A-Za-z0-9._~-/]*, no "//", no "/.", no trailing "/", not /metrics, /_mcs/. */
static int hl_plain_target(const char *t, size_t n) {
    if (n > HL_MAX_TARGET || n < 2 || t[0] != '/' || !hl_first_ok(t[1]) || t[n - 1] == '/')
        return 0;
    for (size_t i = 2; i < n; i++) {
        char ch = t[i];
        if (!(hl_first_ok(ch) || ch == '.' || ch == '/')) return 0;
        if (t[i - 1] == '/' && (ch == '/' || ch == '.')) return 0;
    }
    if (hl_eq(t, n, "/metrics") || (n >= 6 && memcmp(t, "/_mcs/", 6) == 0))
        return 0;
    return 1;
}

/* The file a plain target names, with no symlink on the way (webcache._fs.stat_beneath and the
 * checks of FastPath.plain_file): openat2(O_PATH, RESOLVE_BENEATH | NO_SYMLINKS |
 * NO_MAGICLINKS) + fstat [+ access(R_OK)] + close. A name of one component (no "/") is the
 * same lookup in one call: fstatat(root, name, AT_SYMLINK_NOFOLLOW) walks nothing but that
 * entry of the root (the target has no "." segment), and a symlink there is reported as one
 * (not a regular file: handed over, as openat2's ELOOP is). */
static int hl_stat(hl_loop *L, const char *rel, size_t n, hl_file *f, int readable_needed) {
    struct { unsigned long long flags, mode, resolve; } how = {
        O_PATH | O_CLOEXEC, 0, HL_RESOLVE_BENEATH | HL_RESOLVE_NO_SYMLINKS | HL_RESOLVE_NO_MAGICLINKS};
    struct stat st;
    int rc, readable = 1;
    if (!readable_needed && !memchr(rel, '/', n)) {
        rc = fstatat(L->cfg.root_fd, rel, &st, AT_SYMLINK_NOFOLLOW);
        if (rc != 0)
            return (errno == ENOMEM) ? HL_ERROR : HL_NO_FILE;
    } else {
        int fd = (int)syscall(SYS_openat2, L->cfg.root_fd, rel, &how, sizeof how);
        if (fd < 0)
            return (errno == EMFILE || errno == ENFILE || errno == ENOMEM) ? HL_ERROR : HL_NO_FILE;
        rc = fstat(fd, &st);
        readable = rc == 0 && (!readable_needed
                               || syscall(SYS_faccessat2, fd, "", R_OK, AT_EMPTY_PATH) == 0);
        close(fd);
    }
    if (rc != 0 || !S_ISREG(st.st_mode) || st.st_nlink == 0 || !readable
            || (uint64_t)st.st_size > L->cfg.max_entry
            || st.st_mtim.tv_sec < 0 || st.st_ctim.tv_sec < 0)  /* dated before 1970: not cached */
        return HL_NO_FILE;
    f->size = (uint64_t)st.st_size;
    f->mtime_ns = (uint64_t)st.st_mtim.tv_sec * 1000000000ULL + (uint64_t)st.st_mtim.tv_nsec;
    f->ctime_ns = (uint64_t)st.st_ctim.tv_sec * 1000000000ULL + (uint64_t)st.st_ctim.tv_nsec;
    f->inode = (uint64_t)st.st_ino;
    f->dev = (uint64_t)st.st_dev;
    return HL_HIT;
}

/* Whether the entry at p was cached from this version of the file (size, mtime, inode, device,
 * ctime: webcache.cache's revalidation). */
static inline int hl_entry_is(const hl_layout *Y, const char *p, const hl_file *f) {
    return mcs_load64(p + Y->e_size) == f->size && mcs_load64(p + Y->e_mtime) == f->mtime_ns
        && mcs_load64(p + Y->e_inode) == f->inode && mcs_load64(p + Y->e_dev) == f->dev
        && mcs_load64(p + Y->e_ctime) == f->ctime_ns;
}

/* Pinned: the entry's checks and the checked copy (webcache._hit.copy_out). */
static int hl_copy(hl_loop *L, char *arena, int64_t alen, uint64_t off, uint64_t plen,
                   const hl_file *f, char *dst, uint64_t *sum) {
    const hl_layout *Y = &L->cfg.lay;
    char *p = arena + off;
    if (!hl_entry_is(Y, p, f))
        return HL_STALE;
    uint64_t doff = off + ((Y->entry_header + plen + 7) & ~(uint64_t)7);
    if (!mcs_span_ok((int64_t)doff, (int64_t)f->size, alen, 1))
        return HL_CORRUPT;
    uint64_t summed = mcs_copy_checksum64((unsigned char *)dst, (unsigned char *)arena + doff,
                                          (size_t)f->size);
    if (summed != mcs_load64(p + Y->e_sum))
        return HL_CORRUPT;
    mcs_store64(p + Y->e_access, (uint64_t)L->now);
    *sum = summed;
    return HL_HIT;
}

/* -- sealed copies ----------------------------------------------------------------------------- */

/* The gauges of the copies held (the loop's own account of them: one writer, like hl_count;
 * a negative change wraps back, as the counters are unsigned). */
static inline void hl_sealed_held(hl_loop *L, int64_t copies, int64_t bytes) {
    hl_count(L, HC_SEALED_HELD, (uint64_t)copies);
    hl_count(L, HC_SEALED_BYTES, (uint64_t)bytes);
}

static void hl_sealed_drop(hl_loop *L, hl_sealed *s) {
    if (s->fd >= 0) {
        close(s->fd);  /* pages still queued on a socket stay until it has sent them */
        hl_count(L, HC_SEALED_DROPPED, 1);
        hl_sealed_held(L, -1, -(int64_t)s->size);
    }
    memset(s, 0, sizeof *s);
    s->fd = -1;
}

/* The place of the body whose key hash is h; with ``make``, one is taken for it (an empty one,
 * else the least recently used of its ways, dropped). NULL if there is none. */
static hl_sealed *hl_sealed_place(hl_loop *L, uint64_t h, int make) {
    hl_sealed *victim = NULL;
    for (uint64_t w = 0; w < HL_SEALED_WAYS; w++) {
        hl_sealed *s = &L->sealed[(h + w) & (HL_SEALED_MAX - 1)];
        if (s->taken && s->hash == h) return s;
        if (!victim || (victim->taken && (!s->taken || s->used < victim->used))) victim = s;
    }
    if (!make) return NULL;
    hl_sealed_drop(L, victim);
    victim->taken = 1;
    victim->hash = h;
    return victim;
}

/* Whether the place stands for this version of the file and this stored checksum. */
static inline int hl_sealed_is(const hl_sealed *s, const hl_file *f, uint64_t sum) {
    return s->size == f->size && s->mtime_ns == f->mtime_ns && s->inode == f->inode
        && s->dev == f->dev && s->ctime_ns == f->ctime_ns && s->sum == sum;
}

/* Write data[0:n] at the start of fd; 0, or -1 (errno set). */
static int hl_write_all(int fd, const char *data, size_t n) {
    size_t done = 0;
    while (done < n) {
        ssize_t w = write(fd, data + done, n - done);
        if (w < 0 && errno == EINTR) continue;
        if (w == 0) errno = ENOSPC;
        if (w <= 0) return -1;
        done += (size_t)w;
    }
    return 0;
}

/* A memfd holding data[0:n], sealed against any change; -1 if it cannot be made. */
static int hl_seal_memfd(const char *data, size_t n) {
    int fd = memfd_create("mcs-sealed-hit", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) return -1;
    if (hl_write_all(fd, data, n) < 0
            || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* An unnamed file in the directory dir_fd holding data[0:n]: made with O_TMPFILE | O_EXCL (it
 * never gets a name), written, made mode 0400, and reopened read-only through /proc/self/fd;
 * the writable descriptor is closed, so no descriptor anywhere can write it, and opening one
 * takes CAP_DAC_OVERRIDE or a deliberate chmod by its owner (docs/webcache.md). -1 if it
 * cannot be made (the directory's filesystem full, no O_TMPFILE there, no descriptor). */
static int hl_seal_file(int dir_fd, const char *data, size_t n) {
    char self[64];
    int fd = openat(dir_fd, ".", O_TMPFILE | O_RDWR | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return -1;
    int ro = -1;
    if (hl_write_all(fd, data, n) == 0 && fchmod(fd, 0400) == 0) {
        snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
        ro = open(self, O_RDONLY | O_CLOEXEC);
    }
    close(fd);
    return ro;
}

/* A sealed copy of data[0:n] (see the top of this file); -1 if it cannot be made. */
static int hl_seal(const hl_loop *L, const char *data, size_t n) {
    return L->cfg.sealed_dir_fd >= 0 ? hl_seal_file(L->cfg.sealed_dir_fd, data, n)
                                     : hl_seal_memfd(data, n);
}

/* After a hit served from a verified copy (data: the body, summed to ``sum``): the first time a
 * version is asked for it becomes a candidate; the second time it is sealed, within the
 * budget (the least recently used copies are dropped to make room). */
static void hl_sealed_admit(hl_loop *L, uint64_t h, const hl_file *f, uint64_t sum,
                            const char *data) {
    if (f->size > L->cfg.sealed_budget) return;
    hl_sealed *s = hl_sealed_place(L, h, 1);
    if (!hl_sealed_is(s, f, sum)) {  /* new, or another version: a candidate of this one */
        hl_sealed_drop(L, s);
        s->taken = 1;
        s->hash = h;
        s->size = f->size;
        s->mtime_ns = f->mtime_ns;
        s->inode = f->inode;
        s->dev = f->dev;
        s->ctime_ns = f->ctime_ns;
        s->sum = sum;
        s->used = L->now;
        return;
    }
    s->used = L->now;
    if (s->fd >= 0) return;
    if (L->now < L->seal_retry_at) return;  /* what failed a moment ago would fail again */
    while (hl_counter(L, HC_SEALED_BYTES) + f->size > L->cfg.sealed_budget
           || hl_counter(L, HC_SEALED_HELD) >= L->cfg.sealed_count) {
        hl_sealed *lru = NULL;
        for (int i = 0; i < HL_SEALED_MAX; i++) {
            hl_sealed *t = &L->sealed[i];
            if (t->fd >= 0 && (!lru || t->used < lru->used)) lru = t;
        }
        if (!lru) return;
        hl_sealed_drop(L, lru);
    }
    s->fd = hl_seal(L, data, (size_t)f->size);
    if (s->fd < 0) {
        hl_count(L, HC_SEALED_FAILED, 1);
        L->seal_retry_at = L->now + HL_SEAL_RETRY_NS;
        return;
    }
    hl_count(L, HC_SEALED_MADE, 1);
    hl_sealed_held(L, 1, (int64_t)f->size);
}

/* The cache hit (webcache.cache.McsWebCache.lookup): a verified copy in dst (its sum in *sum),
 * or *sealed, a sealed copy of the entry found (nothing copied), or a reason. */
static int hl_lookup(hl_loop *L, const char *path, size_t plen, uint64_t h, const hl_file *f,
                     char *dst, uint64_t *sum, hl_sealed **sealed) {
    const hl_layout *Y = &L->cfg.lay;
    hl_shared *S = &L->sh;
    int r;
    if (!hl_enter(L))
        return HL_RECOVERY;
    if (mcs_load64(S->root + Y->mf_offset) != S->mf_seen) { r = HL_RECOVERY; goto out; }
    uint64_t boff = Y->buckets_at + (h % Y->buckets) * Y->bucket_size;
    if (!mcs_span_ok((int64_t)boff, (int64_t)Y->bucket_size, S->master_len, 8)) {
        r = HL_UNAVAILABLE;
        goto out;
    }
    char *bucket = S->master + boff;
    void *mutex = bucket + Y->b_mutex;
    if (mcs_load32(&mcs_mutex_meta_of(mutex)->magic) != MCS_MUTEX_MAGIC) { r = HL_UNAVAILABLE; goto out; }
    int rc = mcs_mutex_lock(mutex, S->tag, 0);  /* once; then waiting up to lock_wait */
    if (rc == ETIMEDOUT)
        rc = mcs_mutex_lock(mutex, S->tag, hl_mono() + L->cfg.lock_wait_ns);
    if (rc == EOWNERDEAD) {
        /* A holder died: every update of a bucket is one publishing store, so it is whole
         * (webcache.cache._consistent, the repair the Python path gives McsComponent.lock). */
        if (mcs_mutex_mark_consistent(mutex) != 0) {
            mcs_mutex_release(mutex);
            r = HL_UNAVAILABLE;
            goto out;
        }
        mcs_mutex_owned(mutex, S->tag);
        hl_count(L, HC_REPAIRED, 1);
    } else if (rc == ETIMEDOUT) {
        r = HL_BUSY;
        goto out;
    } else if (rc != 0) {
        r = HL_UNAVAILABLE;
        goto out;
    }
    uint64_t ref = mcs_load64(bucket + Y->b_head), found = 0, off = 0, mask = (1ULL << Y->slot_shift) - 1;
    char *arena = NULL;
    int64_t alen = 0;
    uint64_t steps = 0;
    r = HL_MISS;
    while (ref) {
        int64_t slot = (int64_t)(ref >> Y->slot_shift) - 1;
        off = ref & mask;
        if (slot < 0 || slot >= L->cfg.lay.slots) { r = HL_CORRUPT; break; }
        arena = S->arena[slot];
        alen = S->arena_len[slot];
        if (!arena) { r = HL_UNAVAILABLE; break; }
        if (off < Y->arena_header || !mcs_span_ok((int64_t)off, (int64_t)Y->entry_header, alen, 8)) {
            r = HL_CORRUPT;
            break;
        }
        char *p = arena + off;
        if (mcs_load64(p + Y->e_hash) == h && mcs_load64(p + Y->e_path_len) == plen
                && mcs_span_ok((int64_t)(off + Y->entry_header), (int64_t)plen, alen, 1)
                && memcmp(p + Y->entry_header, path, plen) == 0) {
            found = ref;
            break;
        }
        ref = mcs_load64(p + Y->e_next);
        if (++steps > Y->max_chain) { r = HL_CORRUPT; break; }
    }
    if (!found) {
        mcs_mutex_release(mutex);
        goto out;
    }
    if (L->sealed && f->size >= L->cfg.sealed_min) {
        /* A sealed copy of this entry's version and checksum: nothing to pin or copy. */
        char *p = arena + off;
        hl_sealed *s = hl_sealed_place(L, h, 0);
        if (s && s->fd >= 0 && hl_entry_is(Y, p, f)
                && hl_sealed_is(s, f, mcs_load64(p + Y->e_sum))) {
            mcs_store64(p + Y->e_access, (uint64_t)L->now);
            mcs_mutex_release(mutex);
            s->used = L->now;
            *sealed = s;
            r = HL_HIT;
            goto out;
        }
    }
    /* The journal first, then the pin: a loop that dies between the two leaves a mark whose
     * counter is 0, which the master zeroes again (webcache.cache: lookup). */
    char *mark = S->master + S->mark_off;
    char *pin = arena + off + Y->e_pins + 8 * (uint64_t)S->slot;
    mcs_store64(mark + Y->m_arena, mcs_load64(arena + Y->a_id));
    mcs_store64(mark + Y->m_ref, found);
    mcs_add64(pin, 1);
    mcs_mutex_release(mutex);
    r = hl_copy(L, arena, alen, off, plen, f, dst, sum);
    mcs_add64(pin, (uint64_t)-1);
    mcs_store64(mark + Y->m_ref, 0);
out:
    /* The end of the block: a recovery requested or a memory failure counted during it makes
     * what it read unusable (McsComponent: Recovering at the end of a block). */
    if (r == HL_HIT && (hl_gate_is_closed(L) || mcs_load64(S->root + Y->mf_offset) != S->mf_seen))
        r = HL_RECOVERY;
    hl_leave(L);
    return r;
}

/* Status line and headers (webcache.fastpath.FastPath.header_block + Date + Connection). */
static size_t hl_response_head(hl_loop *L, const hl_request *rq, const hl_file *f, int64_t now_real_ns) {
    char *p = L->head;
    const char *name = rq->target + rq->target_len;
    while (name > rq->target && name[-1] != '/') name--;
    const char *type;
    size_t type_len;
    hl_content_type(L, name, (size_t)(rq->target + rq->target_len - name), &type, &type_len);
    HL_PUTS(&p, "HTTP/1.1 200 OK\r\nETag: \"");
    hl_hex(&p, f->size);
    *p++ = '-';
    hl_hex(&p, f->mtime_ns);
    *p++ = '-';
    hl_hex(&p, f->inode);
    *p++ = '-';
    hl_hex(&p, f->ctime_ns);
    HL_PUTS(&p, "\"\r\nLast-Modified: ");
    uint64_t lm = f->mtime_ns < (uint64_t)now_real_ns ? f->mtime_ns : (uint64_t)now_real_ns;
    int64_t lm_sec = (int64_t)(lm / 1000000000ULL);
    hl_date_memo *memo = &L->last_modified[(uint64_t)lm_sec % HL_DATES];
    if (memo->sec != lm_sec) {
        memo->len = (uint32_t)hl_http_date(memo->text, lm_sec);
        memo->sec = lm_sec;
    }
    hl_put(&p, memo->text, memo->len);
    HL_PUTS(&p, "\r\nContent-Type: ");
    hl_put(&p, type, type_len);
    HL_PUTS(&p, "\r\nAccept-Ranges: bytes\r\nContent-Length: ");
    hl_dec(&p, f->size);
    HL_PUTS(&p, "\r\nX-Mcs-Node: ");
    hl_put(&p, L->cfg.node, strlen(L->cfg.node));
    if (L->cfg.host[0]) { /* X-Mcs-Host: as webcache.fastpath.identity_fields */
        HL_PUTS(&p, "\r\nX-Mcs-Host: ");
        hl_put(&p, L->cfg.host, strlen(L->cfg.host));
    }
    HL_PUTS(&p, "\r\nServer: ");
    hl_put(&p, L->cfg.server, strlen(L->cfg.server));
    HL_PUTS(&p, "\r\nDate: ");
    int64_t sec = now_real_ns / 1000000000LL;
    if (sec != L->date_sec) {
        L->date_sec = sec;
        L->date_len = hl_http_date(L->date, sec);
    }
    hl_put(&p, L->date, L->date_len);
    if (rq->keep_alive && rq->http10) HL_PUTS(&p, "\r\nConnection: keep-alive\r\n\r\n");
    else if (rq->keep_alive) HL_PUTS(&p, "\r\n\r\n");
    else HL_PUTS(&p, "\r\nConnection: close\r\n\r\n");
    return (size_t)(p - L->head);
}

/* ``out`` (malloc'ed, len bytes) is what the socket did not take of a response: it is sent
 * as the socket takes it (EPOLLOUT). -1 if the connection failed (it is closed). */
static int hl_pending(hl_loop *L, hl_conn *c, char *out, size_t len) {
    c->out = out;
    c->out_len = len;
    c->out_off = 0;
    c->phase = HL_SENDING;
    c->stall_left = len;
    c->stall_since = L->now;
    if (hl_watch(L, c, EPOLL_CTL_MOD, EPOLLOUT) < 0) { hl_close(L, c); return -1; }
    return 0;
}

/* Write a response; what the socket does not take is kept (and the connection waits for
 * EPOLLOUT). -1 if the client is gone (the connection is closed). */
static int hl_send(hl_loop *L, hl_conn *c, const char *a, size_t alen, const char *b, size_t blen) {
    struct iovec iov[2];
    struct msghdr msg;
    ssize_t n;
    iov[0].iov_base = (void *)a;
    iov[0].iov_len = alen;
    iov[1].iov_base = (void *)b;
    iov[1].iov_len = blen;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = blen ? 2 : 1;
    do n = sendmsg(c->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT); while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK) { hl_close(L, c); return -1; }
        n = 0;
    }
    size_t total = alen + blen, sent = (size_t)n;
    if (sent == total) return 0;
    size_t left = total - sent;
    char *out = (char *)malloc(left), *q = out;
    if (!out) { hl_count(L, HC_REASON0 + HL_ERROR, 1); hl_close(L, c); return -1; }
    if (sent < alen) { memcpy(q, a + sent, alen - sent); q += alen - sent; memcpy(q, b, blen); }
    else memcpy(q, b + (sent - alen), left);
    return hl_pending(L, c, out, left);
}

/* A response whose body is a sealed copy: the head (held back by MSG_MORE to leave in the
 * body's first segment), then sendfile from the copy. What the socket does not take is read
 * from the copy (which cannot change) and kept, as hl_send does. */
static int hl_send_sealed(hl_loop *L, hl_conn *c, const char *head, size_t hn, int fd,
                          size_t size) {
    ssize_t n;
    off_t off = 0;
    do n = send(c->fd, head, hn, MSG_NOSIGNAL | MSG_DONTWAIT | MSG_MORE); while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK) { hl_close(L, c); return -1; }
        n = 0;
    }
    if ((size_t)n == hn) {
        while ((size_t)off < size) {
            ssize_t k = sendfile(c->fd, fd, &off, size - (size_t)off);
            if (k < 0 && errno == EINTR) continue;
            if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK) { hl_close(L, c); return -1; }
            if (k <= 0) break;
        }
        if ((size_t)off == size) return 0;
    }
    size_t hleft = hn - (size_t)n, left = hleft + (size - (size_t)off);
    char *out = (char *)malloc(left);
    if (!out) { hl_count(L, HC_REASON0 + HL_ERROR, 1); hl_close(L, c); return -1; }
    memcpy(out, head + n, hleft);
    for (size_t done = hleft; done < left;) {
        ssize_t k = pread(fd, out + done, left - done, off + (off_t)(done - hleft));
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) { free(out); hl_count(L, HC_REASON0 + HL_ERROR, 1); hl_close(L, c); return -1; }
        done += (size_t)k;
    }
    return hl_pending(L, c, out, left);
}

enum { HS_KEEP = -1, HS_CLOSE = -2, HS_GONE = -3 };

/* Answer one complete head: HS_KEEP / HS_CLOSE once answered, HS_GONE if the connection
 * failed (closed), else the reason to hand the connection off (nothing written). */
static int hl_serve(hl_loop *L, hl_conn *c, const char *head, size_t n) {
    hl_request rq;
    hl_file f;
    char key[4096 + HL_MAX_TARGET + 1];
    int r = hl_parse(&L->cfg, head, n, &rq);
    if (r != HL_HIT) return r;
    if (hl_is_draining(L)) rq.keep_alive = 0;  /* the node stops: the last response here */
    if (hl_gate_is_closed(L)) return HL_RECOVERY;  /* during a recovery: the disk path */
    if (!hl_plain_target(rq.target, rq.target_len)) return HL_NOT_PLAIN;
    size_t plen = L->cfg.prefix_len + rq.target_len - 1;
    if (plen >= sizeof key) return HL_NOT_PLAIN;
    memcpy(key, L->cfg.prefix, L->cfg.prefix_len);
    memcpy(key + L->cfg.prefix_len, rq.target + 1, rq.target_len - 1);
    key[plen] = 0;
    /* the relative path: the key after the prefix, NUL-terminated */
    r = hl_stat(L, key + L->cfg.prefix_len, rq.target_len - 1, &f,
                rq.head || L->cfg.check_readable);
    if (r != HL_HIT) return r;
    hl_sealed *sealed = NULL;
    if (!rq.head) {
        uint64_t h = hl_key_hash(L, key, plen, L->cfg.prefix_len), sum = 0;
        r = hl_lookup(L, key, plen, h, &f, L->scratch, &sum, &sealed);
        if (r != HL_HIT) return r;
        if (!sealed && L->sealed && f.size >= L->cfg.sealed_min)
            hl_sealed_admit(L, h, &f, sum, L->scratch);
    }
    size_t hn = hl_response_head(L, &rq, &f, L->now_real);
    if (sealed) {
        if (hl_send_sealed(L, c, L->head, hn, sealed->fd, (size_t)f.size) < 0) return HS_GONE;
        hl_count(L, HC_SEALED_HITS, 1);
    } else if (hl_send(L, c, L->head, hn, rq.head ? NULL : L->scratch,
                       rq.head ? 0 : (size_t)f.size) < 0) {
        return HS_GONE;
    }
    hl_count(L, HC_SERVED, 1);
    if (rq.head) {
        hl_count(L, HC_HEADS, 1);
    } else {
        hl_count(L, HC_HITS, 1);
        hl_count(L, HC_BODY_BYTES, f.size);
    }
    return rq.keep_alive ? HS_KEEP : HS_CLOSE;
}

/* -- the connection's bytes --------------------------------------------------------------------- */

enum { HP_DONE = 0, HP_MORE, HP_WAIT, HP_GONE, HP_TURN };

/* Answer the complete heads at the start of buf[0:len] (L->rbuf or c->in); what is left
 * unanswered stays in c->in. HP_DONE: all answered; HP_MORE: a partial head, more bytes are
 * needed; HP_WAIT: output pending; HP_GONE: the connection was closed or handed off; HP_TURN:
 * its turn is used up (L->turn) with complete requests left: the caller posts it. */
static int hl_feed(hl_loop *L, hl_conn *c, char *buf, size_t len) {
    size_t pos = 0;
    int result = HP_DONE;
    while (pos < len) {
        if (c->out_len) { result = HP_WAIT; break; }
        if (L->turn <= 0) { result = HP_TURN; break; }
        size_t window = len - pos < HL_MAX_HEAD ? len - pos : HL_MAX_HEAD;
        const char *end = (const char *)memmem(buf + pos, window, "\r\n\r\n", 4);
        if (!end) {
            if (len - pos >= HL_MAX_HEAD) {  /* too long: aiohttp refuses it */
                hl_hand_off(L, c, HL_PARTIAL, buf + pos, len - pos);
                return HP_GONE;
            }
            result = HP_MORE;
            break;
        }
        size_t hlen = (size_t)(end - (buf + pos));
        int r = hl_serve(L, c, buf + pos, hlen);
        if (r == HS_GONE) return HP_GONE;
        if (r >= 0) {
            hl_hand_off(L, c, r, buf + pos, len - pos);
            return HP_GONE;
        }
        pos += hlen + 4;
        L->turn--;
        if (r == HS_CLOSE) {  /* the rest of the input is dropped */
            if (!c->out_len) { hl_finish(L, c, pos < len); return HP_GONE; }
            c->close_after = 1;
            c->in_len = 0;
            return HP_WAIT;
        }
        if (!c->out_len) {
            c->phase = HL_IDLE;
            c->deadline = L->now + L->cfg.keepalive_timeout_ns;
        }
    }
    size_t left = len - pos;
    if (left == 0) {
        c->in_len = 0;
    } else if (buf == c->in) {
        memmove(c->in, c->in + pos, left);
        c->in_len = left;
    } else {
        if (c->in_cap < left) {
            char *in = (char *)realloc(c->in, left);
            if (!in) { hl_count(L, HC_REASON0 + HL_ERROR, 1); hl_close(L, c); return HP_GONE; }
            c->in = in;
            c->in_cap = left;
        }
        memcpy(c->in, buf + pos, left);
        c->in_len = left;
    }
    return result;
}

/* The socket is readable (or ``again``: a partial head wants more, which must be there now:
 * if it is not, the head goes to Python, as the asyncio fast path hands over a partial head). */
static void hl_readable(hl_loop *L, hl_conn *c, int again) {
    if (c->posted) return;  /* its buffered requests first (its turn): no more input till then */
    for (;;) {
        char *buf;
        size_t have, cap;
        if (c->in_len == 0) {
            buf = L->rbuf;
            have = 0;
            cap = HL_READ_SIZE;
        } else {
            if (c->in_cap < c->in_len + HL_READ_SIZE) {
                char *in = (char *)realloc(c->in, c->in_len + HL_READ_SIZE);
                if (!in) { hl_count(L, HC_REASON0 + HL_ERROR, 1); hl_close(L, c); return; }
                c->in = in;
                c->in_cap = c->in_len + HL_READ_SIZE;
            }
            buf = c->in;
            have = c->in_len;
            cap = c->in_cap;
        }
        ssize_t n = recv(c->fd, buf + have, cap - have, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (again && c->in_len)
                    hl_hand_off(L, c, HL_PARTIAL, c->in, c->in_len);
                return;
            }
            hl_close(L, c);
            return;
        }
        if (n == 0) {  /* end of input: a partial head is Python's (it sees the end too) */
            if (c->in_len) hl_hand_off(L, c, HL_PARTIAL, c->in, c->in_len);
            else hl_close(L, c);
            return;
        }
        int r = hl_feed(L, c, buf, have + (size_t)n);
        if (r == HP_TURN) hl_post(L, c);
        if (r != HP_MORE) return;
        again = 1;
    }
}

/* Answer buf[0:len], bytes of c that were not just read from its socket (its buffered input, or
 * what it came with): then read on if a head is partial, or post it if its turn is used up. */
static void hl_feed_buffered(hl_loop *L, hl_conn *c, char *buf, size_t len) {
    int r = hl_feed(L, c, buf, len);
    if (r == HP_MORE) hl_readable(L, c, 1);
    else if (r == HP_TURN) hl_post(L, c);
}

static void hl_writable(hl_loop *L, hl_conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            hl_close(L, c);
            return;
        }
        c->out_off += (size_t)n;
    }
    free(c->out);
    c->out = NULL;
    c->out_len = c->out_off = 0;
    if (c->close_after) { hl_finish(L, c, 0); return; }
    c->phase = HL_IDLE;
    c->deadline = L->now + L->cfg.keepalive_timeout_ns;
    if (hl_watch(L, c, EPOLL_CTL_MOD, EPOLLIN) < 0) { hl_close(L, c); return; }
    if (c->in_len)  /* pipelined requests that waited for this response */
        hl_feed_buffered(L, c, c->in, c->in_len);
}

/* Connections given to the loop: watched, and fed the bytes they came with. */
static void hl_adopt_queued(hl_loop *L) {
    hl_handoff items[64];
    size_t n;
    for (;;) {
        pthread_mutex_lock(&L->qlock);
        n = L->adopt_n < 64 ? L->adopt_n : 64;
        memcpy(items, L->adopt_q, n * sizeof(hl_handoff));
        memmove(L->adopt_q, L->adopt_q + n, (L->adopt_n - n) * sizeof(hl_handoff));
        L->adopt_n -= n;
        pthread_mutex_unlock(&L->qlock);
        if (!n) return;
        for (size_t i = 0; i < n; i++) {
            hl_conn *c = (hl_conn *)calloc(1, sizeof(hl_conn));
            int one = 1;
            if (!c) {
                close(items[i].fd);
                free(items[i].data);
                hl_open_add(L, -1);
                continue;
            }
            c->fd = items[i].fd;
            c->phase = HL_FRESH;
            c->deadline = L->now + L->cfg.header_timeout_ns;  /* the first head: from accept */
            setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            if (hl_watch(L, c, EPOLL_CTL_ADD, EPOLLIN) < 0) {
                close(c->fd);
                free(c);
                free(items[i].data);
                hl_open_add(L, -1);
                continue;
            }
            c->next = &L->conns;
            c->prev = L->conns.prev;
            L->conns.prev->next = c;
            L->conns.prev = c;
            hl_count(L, HC_ADOPTED, 1);
            if (items[i].len) {
                c->phase = HL_IDLE;  /* a connection given back: its next head has begun */
                L->turn = HL_TURN;
                hl_feed_buffered(L, c, items[i].data, items[i].len);
            }
            free(items[i].data);
        }
    }
}

/* The deadlines (webcache.fastpath.Connection.check): a connection that sent nothing for
 * header_timeout after accept, one idle for keepalive_timeout, one whose client took nothing
 * of a response for send_timeout. */
static void hl_sweep(hl_loop *L) {
    hl_conn *c = L->conns.next;
    while (c != &L->conns) {
        hl_conn *next = c->next;
        if (c->phase == HL_SENDING) {
            size_t left = c->out_len - c->out_off;
            if (left != c->stall_left) {
                c->stall_left = left;
                c->stall_since = L->now;
            } else if (L->now - c->stall_since >= L->cfg.send_timeout_ns) {
                hl_count(L, HC_TIMEOUT_SEND, 1);
                hl_close(L, c);
            }
        } else if (L->now >= c->deadline) {
            if (c->phase != HL_LINGER)
                hl_count(L, c->phase == HL_FRESH ? HC_TIMEOUT_HEADER : HC_TIMEOUT_IDLE, 1);
            hl_close(L, c);
        }
        c = next;
    }
}

/* While draining: close each connection with no request in progress (nothing received that
 * is not answered, nothing to send, no byte waiting in the socket: a request that is arriving
 * is served, with ``Connection: close``, and its connection closed after it). */
static void hl_close_idle(hl_loop *L) {
    hl_conn *c = L->conns.next;
    while (c != &L->conns) {
        hl_conn *next = c->next;
        if (c->phase != HL_SENDING && c->phase != HL_LINGER && c->in_len == 0
                && !hl_input_waiting(c))
            hl_close(L, c);
        c = next;
    }
}

/* The next turn of each connection posted before this call (one posted again by it waits for
 * the next call: the events that arrived meanwhile are handled first). */
static void hl_run_posted(hl_loop *L) {
    hl_conn batch;
    if (L->posted.pnext == &L->posted) return;
    batch.pnext = L->posted.pnext;  /* the whole list moves to batch */
    batch.pprev = L->posted.pprev;
    batch.pnext->pprev = &batch;
    batch.pprev->pnext = &batch;
    L->posted.pnext = L->posted.pprev = &L->posted;
    while (batch.pnext != &batch) {
        hl_conn *c = batch.pnext;
        hl_unpost(c);
        if (c->phase == HL_SENDING || !c->in_len) continue;  /* hl_writable feeds it */
        L->turn = HL_TURN;
        hl_feed_buffered(L, c, c->in, c->in_len);
    }
}

/* The loop; returns 0 after hl_stop, else an errno. Never takes the GIL. */
static int hl_run(hl_loop *L) {
    struct epoll_event ev[HL_EVENTS];
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);  /* signals are the main thread's */
    pthread_setname_np(pthread_self(), "mcs-native-hits");  /* for ps -L, top -H, perf */
    L->now = hl_mono();
    L->now_real = mcs_now_ns(CLOCK_REALTIME);
    L->next_sweep = L->now + L->cfg.sweep_ns;
    while (!__atomic_load_n(&L->stop, __ATOMIC_SEQ_CST)) {
        int64_t wait = (L->next_sweep - L->now) / 1000000 + 1;
        if (L->posted.pnext != &L->posted) wait = 0;  /* turns to give: no sleep */
        int n = epoll_wait(L->epfd, ev, HL_EVENTS, wait < 0 ? 0 : (int)wait);
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        L->now = hl_mono();
        L->now_real = mcs_now_ns(CLOCK_REALTIME);
        for (int i = 0; i < n; i++) {
            hl_conn *c = (hl_conn *)ev[i].data.ptr;
            if (c == NULL) {
                hl_drain_fd(L->wake_fd);
                hl_adopt_queued(L);
                continue;
            }
            L->turn = HL_TURN;
            if (c->phase == HL_SENDING) hl_writable(L, c);
            else if (c->phase == HL_LINGER) hl_discard(L, c);
            else hl_readable(L, c, 0);
        }
        hl_run_posted(L);
        if (L->now >= L->next_sweep) {
            hl_sweep(L);
            L->next_sweep = L->now + L->cfg.sweep_ns;
        }
        if (hl_is_draining(L)) hl_close_idle(L);
    }
    return 0;
}

/* After hl_run returned (or if it never ran, or hl_new failed partway): close every connection
 * and free the loop. Descriptors still queued either way are closed. */
static void hl_free(hl_loop *L) {
    while (L->conns.next != &L->conns) hl_close(L, L->conns.next);
    for (size_t i = 0; i < L->adopt_n; i++) {
        close(L->adopt_q[i].fd);
        free(L->adopt_q[i].data);
    }
    for (size_t i = 0; i < L->hand_n; i++) {
        close(L->hand_q[i].fd);
        free(L->hand_q[i].data);
    }
    for (size_t i = 0; i < L->n_types; i++) free(L->types[i].type);
    free(L->types);
    free(L->adopt_q);
    free(L->hand_q);
    free(L->rbuf);
    free(L->scratch);
    free(L->keys);
    if (L->sealed)
        for (int i = 0; i < HL_SEALED_MAX; i++)
            if (L->sealed[i].fd >= 0) close(L->sealed[i].fd);
    free(L->sealed);
    if (L->epfd >= 0) close(L->epfd);
    if (L->wake_fd >= 0) close(L->wake_fd);
    if (L->py_fd >= 0) close(L->py_fd);
    pthread_mutex_destroy(&L->qlock);
    free(L);
}

#endif
