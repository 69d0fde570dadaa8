#ifndef CFERRYCOMPRESS_SHIM_H
#define CFERRYCOMPRESS_SHIM_H

// The system's LZ4 and Zstandard libraries (Debian: liblz4-dev, libzstd-dev). Only the
// stable APIs are used: LZ4 block compression and zstd's single-shot context functions.
#include <lz4.h>
#include <zstd.h>

#endif
