#ifndef CFERRYLINUX_H
#define CFERRYLINUX_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/// CRC32C (Castagnoli) of `len` bytes, continuing from `crc` (start with 0).
/// Uses the SSE4.2 crc32 instruction when the CPU has it, a table otherwise.
uint32_t ferry_crc32c(uint32_t crc, const void *data, size_t len);

/// Pins the calling thread to the CPUs in `cpus` (count entries). Returns 0 or -errno.
int ferry_pin_thread(const int *cpus, int count);

/// Number of CPUs the calling thread may run on.
int ferry_allowed_cpus(void);

/// Sets SIGKILL as the parent-death signal of the calling process (for children that
/// must not outlive their owner). Returns 0 or -errno.
int ferry_set_pdeathsig(int signal);

/// CPU time (user + system) of the calling thread, in nanoseconds.
uint64_t ferry_thread_cpu_ns(void);

/// CPU time (user + system) of the whole calling process, in nanoseconds.
uint64_t ferry_process_cpu_ns(void);

#endif
