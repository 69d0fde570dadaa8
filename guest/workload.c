/*
 * ferry-workload: the memory workload of Ferry's demo guest.
 *
 * It fills a region of memory with self-checking 4 KiB pages, keeps
 * rewriting ("dirtying") pages at a set rate, keeps verifying every page
 * round-robin, and prints a heartbeat line about ten times a second.  A live
 * migration that loses or mangles memory shows up as FERRY-ERROR lines and
 * status=FAIL; a migration that stalls the guest shows up as a gap in the
 * heartbeat clock.
 *
 * Page layout (4096 bytes = 512 little-endian 64-bit words):
 *   word 0  magic     "FERRYPG1"
 *   word 1  index     page number inside the region
 *   word 2  gen       how many times this page has been written (1 = fill)
 *   word 3  sum       page_sum(payload, index, gen)
 *   word 4.. payload  508 words, generated from (index, gen, fill mode)
 * A separate table holds the generation each page must have, so a page that
 * is self-consistent but stale (an old copy, e.g. a dirty page that a
 * migration failed to resend) is caught as well.
 *
 * Settings come from the kernel command line (/proc/cmdline):
 *   ferry.mem=<MiB> ferry.dirty=<MiB/s> ferry.fill=random|text ferry.hz=<n>
 *   ferry.disk=<dev> ferry.diskmib=<MiB> ferry.diskrate=<MiB/s>
 *
 * With ferry.disk (e.g. vda), it also writes self-checking 4 KiB blocks to
 * the first diskmib MiB of /dev/<dev> at diskrate MiB/s (O_DIRECT, random
 * blocks, same layout as a page with magic "FERRYDK1") and reads back as
 * many written blocks, checking each against the generation it must carry.
 * That table lives in guest memory, which moves with the disk at a
 * migration's switchover: a disk write lost or reordered by the move shows
 * up as a stale block.  Blocks never written are never read (a disk copy
 * must keep them sparse, not fill them).
 * Host-only options: --cmdline STR, --seconds N, --corrupt-test, --dump FILE.
 *
 * Single-threaded on purpose: verification never races a rewrite.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE_BYTES 4096u
#define PAGE_WORDS (PAGE_BYTES / 8u)
#define HDR_WORDS 4u
#define PAYLOAD_WORDS (PAGE_WORDS - HDR_WORDS) /* 508, a multiple of 4 */
#define PAGE_MAGIC 0x3147505952524546ull       /* "FERRYPG1" */
#define DISK_MAGIC 0x314b445952524546ull       /* "FERRYDK1" */

#define K1 0x9e3779b97f4a7c15ull
#define K2 0xc2b2ae3d27d4eb4full
#define K3 0x165667b19e3779f9ull
#define K4 0xd6e8feb86659fd93ull

#define MAX_ERROR_LINES 10

enum fill_mode { FILL_RANDOM = 0, FILL_TEXT = 1 };

/* ------------------------------------------------------------------ */
/* settings and state                                                  */

static struct {
    uint64_t mem_mib;
    double dirty_mib_s;
    enum fill_mode fill;
    unsigned hz;
    int workload; /* ferry.workload (used by /init; parsed for completeness) */
    double verify_mib_s; /* ferry.verify: verification rate; < 0 = as fast as time allows */
    char disk[32];       /* ferry.disk: block device name under /dev, "" = none */
    uint64_t disk_mib;   /* ferry.diskmib */
    double disk_mib_s;   /* ferry.diskrate */
} cfg = {64, 0.0, FILL_RANDOM, 10, 1, -1.0, "", 64, 1.0};

static uint64_t *region;      /* npages * PAGE_WORDS words */
static uint64_t *page_gen;    /* generation each page must carry */
static uint64_t npages;
static uint64_t start_ns;

static uint64_t total_rewritten; /* heartbeat gen= */
static uint64_t total_checked;   /* heartbeat checked= */
static uint64_t total_passes;    /* heartbeat passes= */
static uint64_t total_errors;    /* heartbeat errors= */
static uint64_t verify_cursor;
static uint64_t error_lines;
static uint64_t rng_state = 0x243f6a8885a308d3ull; /* picks pages to dirty */

/* ------------------------------------------------------------------ */
/* small helpers                                                       */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t ms_since_start(void)
{
    return (now_ns() - start_ns) / 1000000ull;
}

/* One line, one write(2): lines never interleave on the console. */
static void emit(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof buf - 2)
        n = (int)(sizeof buf - 2);
    buf[n++] = '\n';
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(1, p, (size_t)n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        p += w;
        n -= (int)w;
    }
}

static inline uint64_t rotl(uint64_t x, unsigned r)
{
    return (x << r) | (x >> (64 - r));
}

/* splitmix64 finaliser: a bijective 64-bit mixer */
static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static inline uint64_t *page_ptr(uint64_t i)
{
    return region + i * PAGE_WORDS;
}

/* ------------------------------------------------------------------ */
/* checksum                                                            */

/*
 * Four independent lanes, each step (h ^ w) * odd, rotated: every step is a
 * bijection of the lane for a fixed word, and the lanes are folded in with a
 * chain of bijective mixes, so any change confined to one 64-bit word (for
 * example one flipped byte) always changes the sum.  Index and generation
 * seed the lanes and are folded in again at the end.
 */
static uint64_t page_sum(const uint64_t *payload, uint64_t index, uint64_t gen)
{
    uint64_t a = index * K1 + 0x6a09e667f3bcc908ull;
    uint64_t b = gen * K2 + 0xbb67ae8584caa73bull;
    uint64_t c = (index ^ gen) * K3 + 0x3c6ef372fe94f82bull;
    uint64_t d = 0xa54ff53a5f1d36f1ull;
    for (unsigned i = 0; i < PAYLOAD_WORDS; i += 4) {
        a = rotl((a ^ payload[i + 0]) * K1, 29);
        b = rotl((b ^ payload[i + 1]) * K1, 29);
        c = rotl((c ^ payload[i + 2]) * K1, 29);
        d = rotl((d ^ payload[i + 3]) * K1, 29);
    }
    uint64_t h = mix64(a ^ index);
    h = mix64(h ^ b);
    h = mix64(h ^ c);
    h = mix64(h ^ d ^ (gen * K4));
    return h;
}

/* ------------------------------------------------------------------ */
/* payload generators                                                  */

static uint64_t page_seed(uint64_t index, uint64_t gen, uint64_t salt)
{
    uint64_t s = mix64(index * K1 ^ mix64(gen + salt));
    return s ? s : K3; /* xorshift must not start at 0 */
}

/* incompressible: xorshift64 stream seeded from (index, gen) */
static void gen_random(uint64_t *payload, uint64_t index, uint64_t gen)
{
    uint64_t s = page_seed(index, gen, 0x52414e444f4d2121ull);
    for (unsigned i = 0; i < PAYLOAD_WORDS; i += 4) {
        payload[i + 0] = xorshift64(&s);
        payload[i + 1] = xorshift64(&s);
        payload[i + 2] = xorshift64(&s);
        payload[i + 3] = xorshift64(&s);
    }
}

/*
 * Compressible, like a server heap: a stream of records built from
 * templates (JSON objects, log lines, HTTP headers, SQL, HTML) whose
 * variable parts are filled with words from a small built-in dictionary,
 * 8-hex-digit ids and random token characters.  Everything is handled as
 * whole 64-bit words (each template becomes a list of 8-byte chunks): no
 * per-byte work on the hot path.  Templates are picked uniformly; words
 * listed first are picked more often (skewed, as in real heaps).  Tuned to
 * compress about 5x with zstd -1 and 3x with lz4 (random fill: 1x).
 */
static const char *const text_templates[] = {
    "{\"id\":%i,\"user\":\"%w\",\"mail\":\"%w@example.com\",\"state\":"
    "\"active\",\"role\":\"%w\"},\n",
    "2024-05-17T12:00:00Z INFO request_id=%i GET /api/v1/%w status=200 "
    "user=%w took=%ius\n",
    "{\"id\":%i,\"order\":%i,\"item\":\"%w\",\"qty\":1,\"price\":\"%i\","
    "\"currency\":\"EUR\",\"ref\":\"%h\"},\n",
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-Id: %i"
    "\r\nETag: \"%h%h\"\r\nCache-Control: no-cache\r\n\r\n",
    "2024-05-17T12:00:01Z WARN slow query on table %w took=%ims rows=%i\n",
    "SELECT * FROM %w WHERE id = %i AND owner = '%w';\n",
    "<div class=\"row\"><span>%w</span><span>%i</span></div>\n",
    "session:%i user=%w token=%h%h%h%h ttl=3600 flags=secure,httponly\n",
};
#define N_TEMPLATES (sizeof text_templates / sizeof text_templates[0])

static const char *const text_words[] = {
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    "ivan", "judy", "mallory", "niaj", "olivia", "peggy", "rupert", "sybil",
    "trent", "victor", "walter", "orders", "invoices", "payments", "shipping",
    "users", "accounts", "sessions", "cart", "search", "admin", "editor",
    "viewer", "owner", "widget", "gadget", "sprocket", "gizmo", "doohicky",
    "thingy", "lever", "bracket", "cable", "adapter", "monitor", "keyboard",
    "mouse", "laptop", "phone", "tablet", "router", "switch", "printer",
    "scanner", "camera", "speaker", "charger", "battery", "socket", "plug",
    "lamp", "desk", "chair", "shelf", "drawer", "door",
};
#define N_WORDS (sizeof text_words / sizeof text_words[0]) /* 64 */

#define TPL_MAX 32
#define TOK_WORD 1 /* placeholders; real chunks are never 0 or 1 */
#define TOK_ID 2
#define TOK_TOKEN 3
static uint64_t tpl_words[N_TEMPLATES][TPL_MAX];
static unsigned tpl_len[N_TEMPLATES];
static uint64_t word_table[N_WORDS];
static uint8_t tpl_pick[256];  /* random byte -> template (uniform) */
static uint8_t word_pick[256]; /* random byte -> dictionary word (skewed) */

static uint64_t chunk8(const char *s)
{
    char b[8];
    memset(b, ' ', 8);
    size_t n = strlen(s);
    memcpy(b, s, n > 8 ? 8 : n);
    uint64_t w;
    memcpy(&w, b, 8);
    return w;
}

/*
 * Turn each template into 8-byte chunks: the literal text between two
 * placeholders ("%w" a word, "%i" an id, "%h" 8 random token characters)
 * is padded with spaces to a multiple of 8 bytes, so that each placeholder
 * fills one whole aligned word.
 */
static void init_text_tables(void)
{
    for (unsigned t = 0; t < N_TEMPLATES; t++) {
        const char *s = text_templates[t];
        unsigned n = 0;
        char lit[9];
        unsigned fill = 0;
        for (;; s++) {
            int ph = s[0] == '%' && (s[1] == 'w' || s[1] == 'i' || s[1] == 'h');
            if (fill == 8 || ((ph || !*s) && fill > 0)) {
                lit[fill] = 0;
                if (n < TPL_MAX)
                    tpl_words[t][n++] = chunk8(lit);
                fill = 0;
            }
            if (!*s)
                break;
            if (ph) {
                if (n < TPL_MAX)
                    tpl_words[t][n++] = s[1] == 'w'   ? TOK_WORD
                                        : s[1] == 'i' ? TOK_ID
                                                      : TOK_TOKEN;
                s++;
            } else {
                lit[fill++] = *s;
            }
        }
        if (n == 0 || n >= TPL_MAX) {
            fprintf(stderr, "ferry-workload: text template %u too long\n", t);
            exit(2);
        }
        tpl_len[t] = n;
    }
    for (unsigned w = 0; w < N_WORDS; w++)
        word_table[w] = chunk8(text_words[w]);
    /* words: slot s -> floor(N * (s/256)^2), a skewed choice */
    for (unsigned s = 0; s < 256; s++) {
        double x = (double)s / 256.0;
        tpl_pick[s] = (uint8_t)((s * N_TEMPLATES) >> 8);
        word_pick[s] = (uint8_t)((double)N_WORDS * x * x);
    }
}

/* 32 bits -> 8 lowercase hex digits, SWAR (digit order is irrelevant) */
static inline uint64_t hex8(uint64_t v)
{
    uint64_t x = v & 0xffffffffull;
    x = (x | (x << 16)) & 0x0000ffff0000ffffull;
    x = (x | (x << 8)) & 0x00ff00ff00ff00ffull;
    x = (x | (x << 4)) & 0x0f0f0f0f0f0f0f0full;
    uint64_t ge10 = ((x + 0x0606060606060606ull) >> 4) & 0x0101010101010101ull;
    return x + 0x3030303030303030ull + ge10 * 39u;
}

static void gen_text(uint64_t *payload, uint64_t index, uint64_t gen)
{
    uint64_t s = page_seed(index, gen, 0x54455854544558ull);
    unsigned i = 0;
    /* start inside a record, so pages do not all begin alike */
    const uint64_t *tpl = tpl_words[s % N_TEMPLATES];
    unsigned k = (unsigned)((s >> 8) % tpl_len[s % N_TEMPLATES]);
    unsigned n = tpl_len[s % N_TEMPLATES];
    for (;;) {
        for (; k < n; k++) {
            uint64_t w = tpl[k];
            if (w == TOK_WORD)
                w = word_table[word_pick[xorshift64(&s) & 0xff]];
            else if (w == TOK_ID)
                w = hex8(xorshift64(&s));
            else if (w == TOK_TOKEN) /* 8 chars in '0'..'o' */
                w = (xorshift64(&s) & 0x3f3f3f3f3f3f3f3full) +
                    0x3030303030303030ull;
            payload[i] = w;
            if (++i == PAYLOAD_WORDS)
                return;
        }
        unsigned t = tpl_pick[xorshift64(&s) & 0xff];
        tpl = tpl_words[t];
        n = tpl_len[t];
        k = 0;
    }
}

static void gen_payload(uint64_t *payload, uint64_t index, uint64_t gen)
{
    if (cfg.fill == FILL_TEXT)
        gen_text(payload, index, gen);
    else
        gen_random(payload, index, gen);
}

/* (re)write page i with generation gen */
static void write_page(uint64_t i, uint64_t gen)
{
    uint64_t *p = page_ptr(i);
    gen_payload(p + HDR_WORDS, i, gen);
    p[0] = PAGE_MAGIC;
    p[1] = i;
    p[2] = gen;
    p[3] = page_sum(p + HDR_WORDS, i, gen);
    page_gen[i] = gen;
}

static void rewrite_page(uint64_t i)
{
    write_page(i, page_gen[i] + 1);
    total_rewritten++;
}

/* ------------------------------------------------------------------ */
/* verification                                                        */

static int corrupt_test;
static uint64_t ct_flip_page = UINT64_MAX, ct_stale_page = UINT64_MAX;
static int ct_flip_seen, ct_stale_seen, ct_other_seen;

static void report_bad_page(uint64_t i, const char *reason)
{
    uint64_t *p = page_ptr(i);
    uint64_t want_gen = page_gen[i];
    /*
     * expected: checksum of the page as it must be (regenerated from index
     * and expected generation); got: checksum of the payload that is there,
     * under the same index and generation; stored: the checksum word found
     * in the page header.  got == expected means only the header is bad.
     */
    static uint64_t scratch[PAYLOAD_WORDS];
    gen_payload(scratch, i, want_gen);
    uint64_t expected = page_sum(scratch, i, want_gen);
    uint64_t got = page_sum(p + HDR_WORDS, i, want_gen);

    total_errors++;
    if (corrupt_test) {
        if (i == ct_flip_page)
            ct_flip_seen = 1;
        else if (i == ct_stale_page)
            ct_stale_seen = 1;
        else
            ct_other_seen = 1;
    }
    if (error_lines < MAX_ERROR_LINES) {
        error_lines++;
        emit("FERRY-ERROR page=%llu expected=%016llx got=%016llx gen=%llu "
             "found_gen=%llu stored=%016llx reason=%s ms=%llu",
             (unsigned long long)i, (unsigned long long)expected,
             (unsigned long long)got, (unsigned long long)want_gen,
             (unsigned long long)p[2], (unsigned long long)p[3], reason,
             (unsigned long long)ms_since_start());
        if (error_lines == MAX_ERROR_LINES)
            emit("FERRY-ERROR-LIMIT further FERRY-ERROR lines suppressed");
    }
    /* heal it so each corruption is counted once */
    rewrite_page(i);
}

static void verify_page(uint64_t i)
{
    const uint64_t *p = page_ptr(i);
    const char *bad = NULL;
    if (p[0] != PAGE_MAGIC)
        bad = "magic";
    else if (p[1] != i)
        bad = "index";
    else if (p[2] != page_gen[i])
        bad = p[2] < page_gen[i] ? "stale" : "ahead";
    else if (p[3] != page_sum(p + HDR_WORDS, i, p[2]))
        bad = "checksum";
    if (bad)
        report_bad_page(i, bad);
}

/* verify the next n pages of the round-robin sweep */
static void verify_some(uint64_t n)
{
    while (n--) {
        verify_page(verify_cursor);
        total_checked++;
        if (++verify_cursor == npages) {
            verify_cursor = 0;
            total_passes++;
        }
    }
}

/* ------------------------------------------------------------------ */
/* disk                                                                */

static int disk_fd = -1;
static uint64_t *disk_gen;   /* generation each block must carry (0: never written) */
static uint64_t *disk_buf;   /* one aligned block for O_DIRECT */
static uint64_t disk_blocks;
static uint64_t disk_written, disk_checked, disk_errors;
static uint64_t disk_max_write_ns; /* the slowest write since the last FERRY-DISK line */
static uint64_t disk_rng = 0x13198a2e03707344ull;

static int disk_open(void)
{
    char path[64];
    snprintf(path, sizeof path, "/dev/%s", cfg.disk);
    /* the device node may appear a moment after the driver is loaded */
    for (int i = 0; i < 50 && disk_fd < 0; i++) {
        disk_fd = open(path, O_RDWR | O_DIRECT | O_SYNC);
        if (disk_fd < 0)
            usleep(100000);
    }
    if (disk_fd < 0) {
        emit("FERRY-FATAL cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    disk_blocks = cfg.disk_mib * (1024 * 1024 / PAGE_BYTES);
    disk_gen = mmap(NULL, disk_blocks * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (disk_gen == MAP_FAILED || posix_memalign((void **)&disk_buf, PAGE_BYTES, PAGE_BYTES)) {
        emit("FERRY-FATAL no memory for the disk table");
        return -1;
    }
    return 0;
}

static void disk_write_block(uint64_t i)
{
    uint64_t gen = disk_gen[i] + 1;
    gen_random(disk_buf + HDR_WORDS, i ^ DISK_MAGIC, gen);
    disk_buf[0] = DISK_MAGIC;
    disk_buf[1] = i;
    disk_buf[2] = gen;
    disk_buf[3] = page_sum(disk_buf + HDR_WORDS, i, gen);
    uint64_t started = now_ns();
    ssize_t w = pwrite(disk_fd, disk_buf, PAGE_BYTES, (off_t)(i * PAGE_BYTES));
    uint64_t took = now_ns() - started;
    if (took > disk_max_write_ns)
        disk_max_write_ns = took;
    if (w != (ssize_t)PAGE_BYTES) {
        disk_errors++;
        total_errors++;
        if (error_lines++ < MAX_ERROR_LINES)
            emit("FERRY-ERROR disk-block=%llu reason=write errno=%d ms=%llu", (unsigned long long)i, errno,
                 (unsigned long long)ms_since_start());
        return;
    }
    disk_gen[i] = gen;
    disk_written++;
}

static void disk_check_block(uint64_t i)
{
    ssize_t r = pread(disk_fd, disk_buf, PAGE_BYTES, (off_t)(i * PAGE_BYTES));
    const char *bad = NULL;
    if (r != (ssize_t)PAGE_BYTES)
        bad = "read";
    else if (disk_buf[0] != DISK_MAGIC)
        bad = "magic";
    else if (disk_buf[1] != i)
        bad = "index";
    else if (disk_buf[2] != disk_gen[i])
        bad = disk_buf[2] < disk_gen[i] ? "stale" : "ahead";
    else if (disk_buf[3] != page_sum(disk_buf + HDR_WORDS, i, disk_buf[2]))
        bad = "checksum";
    disk_checked++;
    if (!bad)
        return;
    disk_errors++;
    total_errors++;
    if (error_lines++ < MAX_ERROR_LINES)
        emit("FERRY-ERROR disk-block=%llu gen=%llu found_gen=%llu reason=%s ms=%llu", (unsigned long long)i,
             (unsigned long long)disk_gen[i], (unsigned long long)disk_buf[2], bad,
             (unsigned long long)ms_since_start());
    disk_write_block(i); /* heal it so each loss is counted once */
}

/* Up to n blocks written at random, each followed by a written block read back, until
 * `until` (a slow disk, e.g. one whose every write crosses the network, must not stop
 * the heartbeat: it is the guest's pulse, not the disk's).  Returns the blocks written. */
static uint64_t disk_step(uint64_t n, uint64_t until)
{
    uint64_t k = 0;
    for (; k < n && now_ns() < until; k++) {
        disk_write_block(((xorshift64(&disk_rng) >> 32) * disk_blocks) >> 32);
        /* a random block that has been written: probe from a random start */
        uint64_t i = ((xorshift64(&disk_rng) >> 32) * disk_blocks) >> 32;
        for (uint64_t t = 0; t < disk_blocks && disk_gen[i] == 0; t++)
            i = i + 1 == disk_blocks ? 0 : i + 1;
        if (disk_gen[i] != 0)
            disk_check_block(i);
    }
    return k;
}

/* ------------------------------------------------------------------ */
/* configuration                                                       */

static void parse_cmdline(const char *cmdline)
{
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ' || *p == '\t' || *p == '\n')
            p++;
        const char *tok = p;
        while (*p && *p != ' ' && *p != '\t' && *p != '\n')
            p++;
        size_t len = (size_t)(p - tok);
        if (len == 0)
            break;
        char t[128];
        if (len >= sizeof t)
            continue;
        memcpy(t, tok, len);
        t[len] = 0;
        char *eq = strchr(t, '=');
        if (!eq || strncmp(t, "ferry.", 6) != 0)
            continue;
        *eq = 0;
        const char *key = t + 6, *val = eq + 1;
        char *end;
        if (!strcmp(key, "mem")) {
            unsigned long long v = strtoull(val, &end, 10);
            if (end != val && v >= 1 && v <= 1024 * 1024)
                cfg.mem_mib = v;
        } else if (!strcmp(key, "dirty")) {
            double v = strtod(val, &end);
            if (end != val && v >= 0 && v < 1e6)
                cfg.dirty_mib_s = v;
        } else if (!strcmp(key, "fill")) {
            if (!strcmp(val, "text"))
                cfg.fill = FILL_TEXT;
            else if (!strcmp(val, "random"))
                cfg.fill = FILL_RANDOM;
        } else if (!strcmp(key, "hz")) {
            unsigned long v = strtoul(val, &end, 10);
            if (end != val && v >= 1 && v <= 1000)
                cfg.hz = (unsigned)v;
        } else if (!strcmp(key, "disk")) {
            if (strlen(val) < sizeof cfg.disk && !strchr(val, '/'))
                strcpy(cfg.disk, val);
        } else if (!strcmp(key, "diskmib")) {
            unsigned long long v = strtoull(val, &end, 10);
            if (end != val && v >= 1 && v <= 1024 * 1024)
                cfg.disk_mib = v;
        } else if (!strcmp(key, "diskrate")) {
            double v = strtod(val, &end);
            if (end != val && v >= 0 && v < 1e5)
                cfg.disk_mib_s = v;
        } else if (!strcmp(key, "workload")) {
            cfg.workload = atoi(val);
        } else if (!strcmp(key, "verify")) {
            if (!strcmp(val, "max")) {
                cfg.verify_mib_s = -1.0;
            } else {
                double v = strtod(val, &end);
                if (end != val && v > 0 && v < 1e6)
                    cfg.verify_mib_s = v;
            }
        }
    }
}

static void read_proc_cmdline(void)
{
    static char buf[4096];
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd < 0)
        return;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return;
    buf[n] = 0;
    parse_cmdline(buf);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: ferry-workload [--cmdline STR] [--seconds N] "
            "[--corrupt-test] [--dump FILE]\n"
            "  settings (kernel command line, or --cmdline):\n"
            "    ferry.mem=<MiB> (64)  ferry.dirty=<MiB/s> (0)  "
            "ferry.fill=random|text (random)  ferry.hz=<n> (10)\n"
            "    ferry.verify=<MiB/s>|max (max: as fast as time allows)\n"
            "  --seconds N     exit after N seconds: 0 if no errors, else 1\n"
            "  --corrupt-test  corrupt two pages after the fill (a flipped "
            "byte, a stale page);\n"
            "                  exit 0 if the verifier reports exactly those\n"
            "  --dump FILE     write the filled region to FILE and exit\n");
}

/* ------------------------------------------------------------------ */

static void sleep_until(uint64_t t)
{
    struct timespec ts = {(time_t)(t / 1000000000ull),
                          (long)(t % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static int dump_region(const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        fprintf(stderr, "ferry-workload: %s: %s\n", path, strerror(errno));
        return 2;
    }
    const char *p = (const char *)region;
    uint64_t left = npages * PAGE_BYTES;
    while (left) {
        ssize_t w = write(fd, p, left > (1u << 20) ? (1u << 20) : left);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "ferry-workload: write %s: %s\n", path,
                    strerror(errno));
            close(fd);
            return 2;
        }
        p += w;
        left -= (uint64_t)w;
    }
    close(fd);
    emit("FERRY-DUMP file=%s bytes=%llu", path,
         (unsigned long long)(npages * PAGE_BYTES));
    return 0;
}

int main(int argc, char **argv)
{
    const char *cmdline_override = NULL, *dump_path = NULL;
    double seconds = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--cmdline") && i + 1 < argc)
            cmdline_override = argv[++i];
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--corrupt-test"))
            corrupt_test = 1;
        else if (!strcmp(argv[i], "--dump") && i + 1 < argc)
            dump_path = argv[++i];
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage();
            return 0;
        } else {
            fprintf(stderr, "ferry-workload: unknown argument '%s'\n", argv[i]);
            usage();
            return 2;
        }
    }

    start_ns = now_ns();
    if (cmdline_override)
        parse_cmdline(cmdline_override);
    else
        read_proc_cmdline();
    if (corrupt_test) {
        cfg.dirty_mib_s = 0; /* a rewrite could heal the injected damage */
        if (seconds <= 0)
            seconds = 300; /* give up rather than hang */
    }

    npages = cfg.mem_mib * (1024 * 1024 / PAGE_BYTES);
    init_text_tables();
    const char *fill_name = cfg.fill == FILL_TEXT ? "text" : "random";

    region = mmap(NULL, npages * PAGE_BYTES, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    page_gen = mmap(NULL, npages * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED || page_gen == MAP_FAILED) {
        emit("FERRY-FATAL mmap of %llu MiB failed: %s",
             (unsigned long long)cfg.mem_mib, strerror(errno));
        return 2;
    }

    /* fill: every page written (so every page is touched), gen 1 */
    const uint64_t pages_per_64mib = 64ull * 1024 * 1024 / PAGE_BYTES;
    uint64_t fill_start = now_ns();
    for (uint64_t i = 0; i < npages; i++) {
        write_page(i, 1);
        if ((i + 1) % pages_per_64mib == 0 || i + 1 == npages)
            emit("FERRY-FILL mib=%llu/%llu",
                 (unsigned long long)((i + 1) * PAGE_BYTES >> 20),
                 (unsigned long long)cfg.mem_mib);
    }
    uint64_t fill_ms = (now_ns() - fill_start) / 1000000ull;
    emit("FERRY-READY mem_mib=%llu fill=%s fill_ms=%llu",
         (unsigned long long)cfg.mem_mib, fill_name,
         (unsigned long long)fill_ms);

    if (dump_path)
        return dump_region(dump_path);

    uint64_t ct_armed_pass = 0;
    if (corrupt_test) {
        /* 1: flip one byte in the payload of a page */
        ct_flip_page = npages / 3;
        ((unsigned char *)(page_ptr(ct_flip_page) + HDR_WORDS))[1234] ^= 0x20;
        /* 2: a stale page: keep an old copy, rewrite it, put the copy back */
        ct_stale_page = (npages * 2) / 3;
        if (ct_stale_page == ct_flip_page)
            ct_stale_page = (ct_flip_page + 1) % npages;
        static uint64_t old[PAGE_WORDS];
        memcpy(old, page_ptr(ct_stale_page), PAGE_BYTES);
        rewrite_page(ct_stale_page);
        memcpy(page_ptr(ct_stale_page), old, PAGE_BYTES);
        emit("FERRY-CORRUPT-TEST flipped=%llu stale=%llu",
             (unsigned long long)ct_flip_page,
             (unsigned long long)ct_stale_page);
        ct_armed_pass = total_passes;
    }

    if (cfg.disk[0] && disk_open() != 0)
        return 2;
    if (cfg.disk[0])
        emit("FERRY-DISK dev=%s mib=%llu rate_mib_s=%.1f", cfg.disk, (unsigned long long)cfg.disk_mib,
             cfg.disk_mib_s);
    const double disk_blocks_per_period = cfg.disk_mib_s * 256.0 / cfg.hz;
    double disk_credit = 0;

    /* main loop: dirty, verify, heartbeat */
    const uint64_t period = 1000000000ull / cfg.hz;
    const double pages_per_ns = cfg.dirty_mib_s * 256.0 / 1e9;
    const double max_credit = cfg.dirty_mib_s * 256.0 * 2.0 / cfg.hz + 1.0;
    const uint64_t dirty_budget = period / 2;            /* at most 50% */
    const uint64_t slack = period / 10 > 2000000 ? period / 10 : 2000000;
    const uint64_t end_ns =
        seconds > 0 ? start_ns + (uint64_t)(seconds * 1e9) : UINT64_MAX;
    double credit = 0;
    /* verification at a set rate leaves the vCPU idle the rest of the time */
    const double verify_pages_per_ns = cfg.verify_mib_s > 0 ? cfg.verify_mib_s * 256.0 / 1e9 : 0;
    double verify_credit = 0;
    uint64_t seq = 0;
    uint64_t last = now_ns();
    uint64_t deadline = last + period;

    for (;;) {
        uint64_t t = now_ns();
        /* 1. dirty the pages owed since the last round (rate in guest time) */
        credit += (double)(t - last) * pages_per_ns;
        last = t;
        if (credit > max_credit)
            credit = max_credit; /* cannot keep up: drop the debt */
        uint64_t dirty_end = t + dirty_budget;
        while (credit >= 1.0) {
            unsigned chunk = credit >= 8.0 ? 8 : (unsigned)credit;
            for (unsigned k = 0; k < chunk; k++) {
                uint64_t r = xorshift64(&rng_state);
                rewrite_page(((r >> 32) * npages) >> 32);
            }
            credit -= chunk;
            if (now_ns() >= dirty_end)
                break;
        }
        /* 2. the disk's writes and reads for this period */
        if (disk_fd >= 0) {
            disk_credit += disk_blocks_per_period;
            if (disk_credit >= 1.0)
                disk_credit -= (double)disk_step((uint64_t)disk_credit, now_ns() + period / 2);
            if (disk_credit > 2.0 * disk_blocks_per_period + 1.0)
                disk_credit = 2.0 * disk_blocks_per_period + 1.0; /* cannot keep up: drop the debt */
        }
        /* 3. verify with the time left, keeping some slack (or at the set rate) */
        uint64_t verify_end = deadline > slack ? deadline - slack : deadline;
        if (verify_pages_per_ns > 0) {
            verify_credit += (double)period * verify_pages_per_ns;
            while (verify_credit >= 32.0 && now_ns() < verify_end) {
                verify_some(32);
                verify_credit -= 32.0;
            }
            if (verify_credit > 4.0 * (double)npages)
                verify_credit = 4.0 * (double)npages;
        } else {
            while (now_ns() < verify_end)
                verify_some(32);
        }
        /* 4. heartbeat */
        sleep_until(deadline);
        if (disk_fd >= 0 && seq % cfg.hz == 0) {
            emit("FERRY-DISK written=%llu checked=%llu errors=%llu max_write_ms=%llu", (unsigned long long)disk_written,
                 (unsigned long long)disk_checked, (unsigned long long)disk_errors,
                 (unsigned long long)(disk_max_write_ns / 1000000));
            disk_max_write_ns = 0;
        }
        emit("FERRY-HB seq=%llu ms=%llu mem_mib=%llu gen=%llu checked=%llu "
             "passes=%llu errors=%llu status=%s",
             (unsigned long long)seq++, (unsigned long long)ms_since_start(),
             (unsigned long long)cfg.mem_mib,
             (unsigned long long)total_rewritten,
             (unsigned long long)total_checked,
             (unsigned long long)total_passes,
             (unsigned long long)total_errors, total_errors ? "FAIL" : "OK");
        deadline += period;
        t = now_ns();
        if (t > deadline + period) /* guest was paused or starved: resync */
            deadline = t + period;

        if (corrupt_test && total_passes >= ct_armed_pass + 2) {
            int ok = ct_flip_seen && ct_stale_seen && !ct_other_seen;
            emit("FERRY-CORRUPT-TEST result=%s flip_detected=%d "
                 "stale_detected=%d other_errors=%d",
                 ok ? "PASS" : "FAIL", ct_flip_seen, ct_stale_seen,
                 ct_other_seen);
            return ok ? 0 : 1;
        }
        if (t >= end_ns) {
            if (corrupt_test) {
                emit("FERRY-CORRUPT-TEST result=FAIL timeout");
                return 1;
            }
            return total_errors ? 1 : 0;
        }
    }
}
