#ifndef CFERRYAEAD_SHIM_H
#define CFERRYAEAD_SHIM_H

// OpenSSL's libcrypto (Debian: libssl-dev), for AES-256-GCM on chunk payloads in place:
// the EVP interface seals into a buffer the caller owns and opens where the bytes lie,
// where swift-crypto's API returns a new buffer per call (see docs/SECURITY.md, "Cost").
#include <openssl/evp.h>

#endif
