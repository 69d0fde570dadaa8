#define _GNU_SOURCE
#include "CFerryLinux.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/resource.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <net/if.h>
#include <linux/if_tun.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>

/* ---- CRC32C ------------------------------------------------------------------ */

static uint32_t crc32c_table[8][256];
static int crc32c_table_ready;
static int crc32c_have_sse42 = -1;

static void crc32c_init_table(void) {
    const uint32_t poly = 0x82F63B78u; /* reflected Castagnoli polynomial */
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ poly : c >> 1;
        crc32c_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = crc32c_table[0][n];
        for (int t = 1; t < 8; t++) {
            c = crc32c_table[0][c & 0xff] ^ (c >> 8);
            crc32c_table[t][n] = c;
        }
    }
    __atomic_store_n(&crc32c_table_ready, 1, __ATOMIC_RELEASE);
}

static uint32_t crc32c_soft(uint32_t crc, const unsigned char *p, size_t len) {
    if (!__atomic_load_n(&crc32c_table_ready, __ATOMIC_ACQUIRE)) crc32c_init_table();
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc;
        crc = crc32c_table[7][v & 0xff] ^ crc32c_table[6][(v >> 8) & 0xff] ^
              crc32c_table[5][(v >> 16) & 0xff] ^ crc32c_table[4][(v >> 24) & 0xff] ^
              crc32c_table[3][(v >> 32) & 0xff] ^ crc32c_table[2][(v >> 40) & 0xff] ^
              crc32c_table[1][(v >> 48) & 0xff] ^ crc32c_table[0][v >> 56];
        p += 8;
        len -= 8;
    }
    while (len--) crc = crc32c_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const unsigned char *p, size_t len) {
    uint64_t c = crc;
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        len -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (len--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#endif

uint32_t ferry_crc32c(uint32_t crc, const void *data, size_t len) {
    const unsigned char *p = data;
    crc = ~crc;
#if defined(__x86_64__)
    if (crc32c_have_sse42 < 0) {
        __builtin_cpu_init();
        crc32c_have_sse42 = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    }
    if (crc32c_have_sse42) return ~crc32c_hw(crc, p, len);
#endif
    return ~crc32c_soft(crc, p, len);
}

/* ---- threads and processes ----------------------------------------------------- */

int ferry_pin_thread(const int *cpus, int count) {
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int i = 0; i < count; i++) {
        if (cpus[i] >= 0 && cpus[i] < CPU_SETSIZE) CPU_SET(cpus[i], &set);
    }
    int rc = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    return rc == 0 ? 0 : -rc;
}

long ferry_send_with_fd(int socket, const void *bytes, unsigned long length, int fd) {
    struct iovec iov = { .iov_base = (void *)bytes, .iov_len = length };
    union { char buffer[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } control;
    memset(&control, 0, sizeof(control));
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buffer, .msg_controllen = sizeof(control.buffer) };
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    long n;
    do { n = sendmsg(socket, &msg, MSG_NOSIGNAL); } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

int ferry_accept_cloexec(int socket, struct sockaddr *address, socklen_t *length) {
    return accept4(socket, address, length, SOCK_CLOEXEC);
}

int ferry_set_send_buffer(int socket, int bytes) {
    if (setsockopt(socket, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof(bytes)) != 0 &&
        setsockopt(socket, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes)) != 0) return -errno;
    int actual = 0;
    socklen_t length = sizeof(actual);
    if (getsockopt(socket, SOL_SOCKET, SO_SNDBUF, &actual, &length) != 0) return -errno;
    return actual;
}

void ferry_name_thread(const char *name) {
    char shortened[16];
    strncpy(shortened, name, sizeof(shortened) - 1);
    shortened[sizeof(shortened) - 1] = 0;
    prctl(PR_SET_NAME, shortened, 0, 0, 0);
}

int ferry_allowed_cpus(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
    return CPU_COUNT(&set);
}

int ferry_set_pdeathsig(int sig) {
    return prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0 ? 0 : -errno;
}

static uint64_t clock_ns(clockid_t id) {
    struct timespec ts;
    if (clock_gettime(id, &ts) != 0) return 0;
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t ferry_thread_cpu_ns(void) { return clock_ns(CLOCK_THREAD_CPUTIME_ID); }
uint64_t ferry_process_cpu_ns(void) { return clock_ns(CLOCK_PROCESS_CPUTIME_ID); }

/* ---- splice, tee, pipes -------------------------------------------------------- */

ssize_t ferry_splice(int in, int out, size_t len, int more, int nonblocking) {
    unsigned int flags = SPLICE_F_MOVE;
    if (more) flags |= SPLICE_F_MORE;
    if (nonblocking) flags |= SPLICE_F_NONBLOCK;
    for (;;) {
        ssize_t n = splice(in, NULL, out, NULL, len, flags);
        if (n >= 0) return n;
        if (errno != EINTR) return -errno;
    }
}

ssize_t ferry_tee(int in, int out, size_t len) {
    for (;;) {
        ssize_t n = tee(in, out, len, SPLICE_F_NONBLOCK);
        if (n >= 0) return n;
        if (errno != EINTR) return -errno;
    }
}

int ferry_pipe(int fds[2], int capacity) {
    if (pipe2(fds, O_CLOEXEC) != 0) return -errno;
    if (fcntl(fds[1], F_SETPIPE_SZ, capacity) < 0) {
        int e = errno;
        close(fds[0]);
        close(fds[1]);
        return -e;
    }
    return 0;
}

long ferry_raise_nofile_limit(void) {
    struct rlimit r;
    if (getrlimit(RLIMIT_NOFILE, &r) != 0) return -errno;
    if (r.rlim_cur < r.rlim_max) {
        r.rlim_cur = r.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &r) != 0) return -errno;
    }
    return (long)r.rlim_cur;
}

/* ---- Network namespaces -------------------------------------------------------- */

int ferry_enter_network_namespace(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = setns(fd, CLONE_NEWNET);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

/* ---- Direct I/O ---------------------------------------------------------------- */

int ferry_supports_direct_io(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd >= 0) {
        close(fd);
        return 1;
    }
    /* EINVAL is the filesystem saying no; anything else (a missing file) is for the
       caller's own open to report. */
    return errno == EINVAL ? 0 : -errno;
}

/* ---- Guest NICs: taps and bridges ---------------------------------------------- */

int ferry_tap_open(const char *name) {
    if (strlen(name) >= IFNAMSIZ) return -ENAMETOOLONG;
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        /* A fresh container may lack the node although the kernel has tun. */
        mkdir("/dev/net", 0755);
        if (mknod("/dev/net/tun", S_IFCHR | 0666, makedev(10, 200)) != 0 && errno != EEXIST) return -errno;
        fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    }
    if (fd < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int ferry_tap_name(int fd, char *name) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    if (ioctl(fd, TUNGETIFF, &ifr) != 0) return -errno;
    memcpy(name, ifr.ifr_name, IFNAMSIZ);
    name[IFNAMSIZ - 1] = 0;
    return 0;
}

static int ioctl_socket(void) {
    return socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
}

int ferry_link_set_up(const char *ifname, int up) {
    if (strlen(ifname) >= IFNAMSIZ) return -ENAMETOOLONG;
    int s = ioctl_socket();
    if (s < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    int rc = ioctl(s, SIOCGIFFLAGS, &ifr);
    if (rc == 0) {
        if (up) ifr.ifr_flags |= IFF_UP; else ifr.ifr_flags &= ~IFF_UP;
        rc = ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    int e = errno;
    close(s);
    return rc == 0 ? 0 : -e;
}

int ferry_bridge_attach(const char *bridge, const char *ifname, int attach) {
    if (strlen(bridge) >= IFNAMSIZ) return -ENAMETOOLONG;
    unsigned index = if_nametoindex(ifname);
    if (index == 0) return -ENODEV;
    int s = ioctl_socket();
    if (s < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    strncpy(ifr.ifr_name, bridge, IFNAMSIZ - 1);
    ifr.ifr_ifindex = (int)index;
    int rc = ioctl(s, attach ? SIOCBRADDIF : SIOCBRDELIF, &ifr);
    int e = errno;
    close(s);
    return rc == 0 ? 0 : -e;
}

int ferry_pidfd_getfd(int pid, int fd) {
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0) return -errno;
    int copy = (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
    int e = errno;
    close(pidfd);
    return copy < 0 ? -e : copy;
}

int ferry_userfaultfd_check(void) {
#ifdef SYS_userfaultfd
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0) {
        close(fd);
        return 0;
    }
    int err = errno;
#else
    int err = ENOSYS;
#endif
    /* Linux 6.1 on: the device, for processes the sysctl keeps from the syscall. */
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        close(dev);
        return 0;
    }
    return -err;
}
