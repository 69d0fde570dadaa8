#ifndef CFERRYLINUX_H
#define CFERRYLINUX_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

/// CRC32C (Castagnoli) of `len` bytes, continuing from `crc` (start with 0).
/// Uses the SSE4.2 crc32 instruction when the CPU has it, a table otherwise.
uint32_t ferry_crc32c(uint32_t crc, const void *data, size_t len);

/// Pins the calling thread to the CPUs in `cpus` (count entries). Returns 0 or -errno.
int ferry_pin_thread(const int *cpus, int count);

/// Names the calling thread (the kernel keeps 15 bytes): what top -H, ps -L and perf show.
void ferry_name_thread(const char *name);

/// Sends `length` bytes on the unix socket `socket` with the descriptor `fd` attached
/// (SCM_RIGHTS), as QMP's getfd expects. Returns the bytes sent or -errno.
long ferry_send_with_fd(int socket, const void *bytes, unsigned long length, int fd);

/// accept4(2) with SOCK_CLOEXEC: the accepted socket is never inherited by a process
/// started meanwhile (a QEMU), as it could be between accept and fcntl.
int ferry_accept_cloexec(int socket, struct sockaddr *address, socklen_t *length);

/// Sets a socket's send buffer to `bytes`, past net.core.wmem_max if the caller may
/// (SO_SNDBUFFORCE, CAP_NET_ADMIN), else up to it (SO_SNDBUF). Returns the size the
/// kernel then reports (it doubles the request for its bookkeeping) or -errno.
int ferry_set_send_buffer(int socket, int bytes);

/// Number of CPUs the calling thread may run on.
int ferry_allowed_cpus(void);

/// Sets SIGKILL as the parent-death signal of the calling process (for children that
/// must not outlive their owner). Returns 0 or -errno.
int ferry_set_pdeathsig(int signal);

/// CPU time (user + system) of the calling thread, in nanoseconds.
uint64_t ferry_thread_cpu_ns(void);

/// CPU time (user + system) of the whole calling process, in nanoseconds.
uint64_t ferry_process_cpu_ns(void);

/// splice(2) between `in` and `out` (one of them a pipe), no offsets. `more`: the socket
/// written to should expect more data (SPLICE_F_MORE); `nonblocking`: the pipe side does
/// not block (SPLICE_F_NONBLOCK). Pages are moved, not copied (SPLICE_F_MOVE).
/// Returns the bytes moved, 0 at end of input, or -errno.
ssize_t ferry_splice(int in, int out, size_t len, int more, int nonblocking);

/// tee(2): duplicates up to `len` bytes from pipe `in` into pipe `out` without consuming
/// them (page references, no copy). Returns the bytes duplicated or -errno.
ssize_t ferry_tee(int in, int out, size_t len);

/// A pipe (both ends close-on-exec) of at least `capacity` bytes (F_SETPIPE_SZ). Returns
/// 0 with the descriptors in fds[0] (read) and fds[1] (write), or -errno.
int ferry_pipe(int fds[2], int capacity);

/// Raises the soft limit of open files to the hard limit. Returns the new soft limit.
long ferry_raise_nofile_limit(void);

/// Moves the calling thread into the network namespace at `path` (e.g.
/// /var/run/netns/NAME); threads it starts later are there too. 0, or -1 with errno.
int ferry_enter_network_namespace(const char *path);

/// Whether the filesystem holding `path` takes O_DIRECT: 1 yes, 0 no (EINVAL), or -errno
/// if the file cannot be opened at all.
int ferry_supports_direct_io(const char *path);

/* ---- Guest NICs: taps and bridges --------------------------------------------- */

/// Creates the tap `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, one queue) and returns its
/// descriptor (close-on-exec), or -errno: -EBUSY if a tap of that name is open elsewhere.
/// The tap is not persistent: it goes when its last descriptor closes (its QEMU exits).
/// Creates /dev/net/tun (character device 10:200) where a fresh container lacks it.
int ferry_tap_open(const char *name);

/// The name of the tap behind descriptor `fd` (TUNGETIFF) into `name` (16 bytes); 0 or -errno.
int ferry_tap_name(int fd, char *name);

/// Sets interface `ifname` up or down (SIOCSIFFLAGS). 0 or -errno.
int ferry_link_set_up(const char *ifname, int up);

/// Adds interface `ifname` to bridge `bridge` (SIOCBRADDIF), or removes it (SIOCBRDELIF)
/// when `attach` is 0. 0 or -errno (-ENODEV: no such bridge or interface).
int ferry_bridge_attach(const char *bridge, const char *ifname, int attach);

/// A copy, in this process, of descriptor `fd` of process `pid` (pidfd_getfd(2), Linux
/// 5.6+; needs ptrace rights over it): the same open file, close-on-exec here. The
/// descriptor, or -errno.
int ferry_pidfd_getfd(int pid, int fd);

/// Whether this process may create a userfaultfd (userfaultfd(2), or /dev/userfaultfd
/// where the syscall is refused), as a destination QEMU in postcopy must: 0, or -errno of
/// the last attempt.
int ferry_userfaultfd_check(void);

#endif
