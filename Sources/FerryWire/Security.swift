import CFerryAEAD
import Crypto
import Foundation

// Authentication and encryption: the cluster key, the handshake that proves both hosts
// hold it, the per-session keys derived from it, and the AEAD that seals frames.
// docs/SECURITY.md has the threat model and the reasoning; docs/PROTOCOL.md the bytes.

/// Why a security check failed. Every case says what was being checked.
public enum SecurityError: Error, Equatable, Sendable, CustomStringConvertible {
    case keyFile(String)
    case authenticationFailed(String)
    case sealedFrameRejected(String)

    public var description: String {
        switch self {
        case .keyFile(let why): return "cluster key: \(why)"
        case .authenticationFailed(let why): return "authentication failed: \(why)"
        case .sealedFrameRejected(let why): return "sealed frame rejected: \(why)"
        }
    }
}

/// A 256-bit secret shared by every host of a cluster (see docs/SECURITY.md for why a
/// shared key rather than per-host key pairs). It never crosses the wire: hosts prove
/// they hold it by MAC over fresh nonces, and name it by a short one-way id.
public struct ClusterKey: Sendable, Equatable {
    public static let byteCount = 32
    /// The first word of a key line in a key file, with the format's version.
    public static let linePrefix = "ferry-cluster-key-v1"
    public let bytes: [UInt8]

    public init(bytes: [UInt8]) {
        precondition(bytes.count == Self.byteCount)
        self.bytes = bytes
    }

    public static func generate() -> ClusterKey {
        let key = SymmetricKey(size: .bits256)
        return ClusterKey(bytes: key.withUnsafeBytes { Array($0) })
    }

    /// 16 hex digits of SHA-256("ferry-key-id-v1" | key): names the key in `hello` so a
    /// host holding several keys (during a rotation) knows which one to prove, and says
    /// nothing useful about the key itself.
    public var id: String {
        var h = SHA256()
        h.update(data: Array("ferry-key-id-v1".utf8))
        h.update(data: bytes)
        return Hex.encode(Array(h.finalize()).prefix(8))
    }

    public var line: String { "\(Self.linePrefix) \(Hex.encode(bytes))" }
    var symmetric: SymmetricKey { SymmetricKey(data: bytes) }
}

/// The keys a host accepts, the first being the one it uses when it migrates out. A key
/// file holds one key per line (`ferry-cluster-key-v1 <64 hex digits>`); `#` starts a
/// comment. Two lines let a cluster rotate its key without a flag day.
public struct KeyRing: Sendable, Equatable {
    public let keys: [ClusterKey]

    public init(keys: [ClusterKey]) {
        precondition(!keys.isEmpty)
        self.keys = keys
    }

    public var primary: ClusterKey { keys[0] }
    public func key(id: String) -> ClusterKey? { keys.first { $0.id == id } }
    public var fileText: String { keys.map(\.line).joined(separator: "\n") + "\n" }

    public static func parse(_ text: String) throws(SecurityError) -> KeyRing {
        var keys: [ClusterKey] = []
        // `isNewline`, not "\n": Swift takes "\r\n" as one character, so a file with Windows
        // line ends would otherwise be one long line.
        for (number, raw) in text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline).enumerated() {
            let line = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init)?
                .trimmingCharacters(in: .whitespaces) ?? ""
            if line.isEmpty { continue }
            let words = line.split(separator: " ", omittingEmptySubsequences: true)
            guard words.count == 2, words[0] == ClusterKey.linePrefix else {
                throw .keyFile("line \(number + 1) is not '\(ClusterKey.linePrefix) <64 hex digits>'")
            }
            guard let bytes = Hex.decode(String(words[1])), bytes.count == ClusterKey.byteCount else {
                throw .keyFile("line \(number + 1): the key must be 64 hex digits (256 bits)")
            }
            keys.append(ClusterKey(bytes: bytes))
        }
        guard !keys.isEmpty else { throw .keyFile("no key in the file") }
        return KeyRing(keys: keys)
    }

    /// Reads a key file, refusing one that others than its owner may read or write (as
    /// ssh does with private keys: a readable key is a leaked key).
    public static func load(path: String) throws(SecurityError) -> KeyRing {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw .keyFile("cannot read \(path): \(String(cString: strerror(errno))) (create one with `ferry keygen`)")
        }
        guard info.st_mode & S_IFMT == S_IFREG else { throw .keyFile("\(path) is not a regular file") }
        guard info.st_mode & 0o077 == 0 else {
            throw .keyFile("\(path) is accessible to group or others (mode \(String(info.st_mode & 0o777, radix: 8))); chmod 600 it")
        }
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw .keyFile("cannot read \(path)")
        }
        do {
            return try parse(text)
        } catch {
            if case .keyFile(let why) = error { throw .keyFile("\(path): \(why)") }
            throw error
        }
    }
}

// MARK: - The handshake

/// In `hello`: the source names its key and brings a fresh nonce and ephemeral key share.
public struct AuthOffer: Codable, Equatable, Sendable {
    public var keyID: String
    /// 32 random bytes, hex.
    public var nonce: String
    /// The source's ephemeral X25519 public key, hex (32 bytes).
    public var share: String
    public init(keyID: String, nonce: String, share: String) {
        self.keyID = keyID
        self.nonce = nonce
        self.share = share
    }
}

/// In `welcome`: the destination's fresh nonce and key share, and its proof of the key
/// over the whole exchange so far.
public struct AuthReply: Codable, Equatable, Sendable {
    public var nonce: String
    public var share: String
    public var proof: String
    public init(nonce: String, share: String, proof: String) {
        self.nonce = nonce
        self.share = share
        self.proof = proof
    }
}

/// One side's ephemeral X25519 key for one handshake: mixed into the session keys so that
/// recorded traffic stays secret even if the cluster key leaks later (forward secrecy).
// swift-crypto 3 does not mark its keys Sendable; `key` is immutable and only read.
public struct EphemeralKey: @unchecked Sendable {
    private let key = Curve25519.KeyAgreement.PrivateKey()
    public init() {}

    /// The public half, hex, as it travels in `hello`/`welcome`.
    public var share: String { Hex.encode(Array(key.publicKey.rawRepresentation)) }

    /// The shared secret with the peer's share; refuses a malformed or low-order share.
    public func agree(with peerShare: String) throws(SecurityError) -> [UInt8] {
        guard let raw = Hex.decode(peerShare), raw.count == 32,
              let peer = try? Curve25519.KeyAgreement.PublicKey(rawRepresentation: raw),
              let secret = try? key.sharedSecretFromKeyAgreement(with: peer) else {
            throw .authenticationFailed("the peer's key share is malformed")
        }
        let bytes = secret.withUnsafeBytes { Array($0) }
        guard bytes.contains(where: { $0 != 0 }) else { throw .authenticationFailed("the peer's key share is degenerate") }
        return bytes
    }
}

/// The `auth` frame: the source's proof of the key over the whole exchange.
public struct AuthMessage: Codable, Equatable, Sendable {
    public var proof: String
    public init(proof: String) { self.proof = proof }
}

/// Mutual authentication by proof of the cluster key, with no secret on the wire and no
/// replay: each side's proof is an HMAC over the other side's fresh nonce (carried in the
/// transcript), so a recorded proof is worthless in any other exchange.
///
/// 1. source → `hello` {…, auth: {keyID, nonceS, shareS}}
/// 2. destination → `welcome` {…, auth: {nonceD, shareD, proofD}}
///    proofD = HMAC(K, "ferry-auth-v1 destination" | SHA-256(hello payload) | nonceD | shareD | version)
/// 3. source checks proofD → `auth` {proofS}
///    proofS = HMAC(K, "ferry-auth-v1 source" | SHA-256(hello payload) | SHA-256(welcome payload))
/// 4. destination checks proofS. Both derive the session keys from K, the X25519 secret
///    of the two shares, and both nonces. The proofs cover both shares, so nobody in the
///    middle can swap them.
public enum Handshake {
    public static let nonceByteCount = 32

    public static func newNonce() -> String { Hex.random(byteCount: nonceByteCount) }

    public static func destinationProof(key: ClusterKey, helloPayload: [UInt8], destinationNonce: String,
                                        destinationShare: String, version: UInt16) -> String {
        var m = Array("ferry-auth-v1 destination".utf8)
        m += Array(SHA256.hash(data: helloPayload))
        m += Array(destinationNonce.utf8)
        m += Array(destinationShare.utf8)
        withUnsafeBytes(of: version.bigEndian) { m += $0 }
        return Hex.encode(Array(HMAC<SHA256>.authenticationCode(for: m, using: key.symmetric)))
    }

    public static func sourceProof(key: ClusterKey, helloPayload: [UInt8], welcomePayload: [UInt8]) -> String {
        var m = Array("ferry-auth-v1 source".utf8)
        m += Array(SHA256.hash(data: helloPayload))
        m += Array(SHA256.hash(data: welcomePayload))
        return Hex.encode(Array(HMAC<SHA256>.authenticationCode(for: m, using: key.symmetric)))
    }

    /// Compares two proofs in time independent of where they differ.
    public static func equal(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8), y = Array(b.utf8)
        guard x.count == y.count else { return false }
        var diff: UInt8 = 0
        for (p, q) in zip(x, y) { diff |= p ^ q }
        return diff == 0
    }

    /// A nonce as the peer sent it: exactly 32 bytes of hex, or nil.
    public static func validNonce(_ text: String) -> Bool {
        Hex.decode(text)?.count == nonceByteCount
    }
}

/// The keys of one migration session, derived with HKDF-SHA256 from the cluster key, the
/// ephemeral X25519 secret and both nonces: fresh for every session, one per direction and
/// purpose, so that a nonce never repeats under a key however the channels are numbered.
// All `let`: only `SymmetricKey` keeps it from being plain Sendable, which swift-crypto 3
// does not mark although it is immutable.
public struct SessionKeys: @unchecked Sendable {
    public let controlToDestination: SymmetricKey
    public let controlToSource: SymmetricKey
    public let dataToDestination: SymmetricKey
    public let dataToSource: SymmetricKey
    /// Binds data channels to the session (``ChannelBinding``).
    public let bind: [UInt8]

    public init(key: ClusterKey, sharedSecret: [UInt8], sourceNonce: String, destinationNonce: String) {
        let salt = Array(sourceNonce.utf8) + Array(destinationNonce.utf8)
        let material = SymmetricKey(data: key.bytes + sharedSecret)
        func derive(_ label: String) -> SymmetricKey {
            HKDF<SHA256>.deriveKey(inputKeyMaterial: material, salt: salt,
                                   info: Array("ferry-session-v1 \(label)".utf8), outputByteCount: 32)
        }
        controlToDestination = derive("control source-to-destination")
        controlToSource = derive("control destination-to-source")
        dataToDestination = derive("data source-to-destination")
        dataToSource = derive("data destination-to-source")
        bind = derive("bind").withUnsafeBytes { Array($0) }
    }
}

// MARK: - Sealing frames

/// AES-256-GCM over frame payloads, with implicit nonces: the 12-byte nonce is the
/// connection's number (4 bytes; the control connection is 0xFFFFFFFF, data channels
/// their bound index) and a per-connection frame counter (8 bytes), neither sent. The
/// receiver computes the nonce it expects, so a frame that is replayed, reordered,
/// dropped or moved to another connection fails authentication like a tampered one.
/// Keys are per session and direction and a session never binds a channel number twice,
/// so no (key, nonce) pair repeats: a chunk sent again after a failover goes out on
/// another connection under that connection's next nonce.
///
/// The frame type, the flags and any cleartext sub-header are authenticated data; the
/// 16-byte tag follows the ciphertext in the payload.
public enum FrameSeal {
    public static let tagByteCount = 16
    public static let controlConnection: UInt32 = 0xFFFF_FFFF

    static func nonceBytes(_ connection: UInt32, _ counter: UInt64) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 12)
        bytes.withUnsafeMutableBytes {
            $0.storeBytes(of: connection.bigEndian, toByteOffset: 0, as: UInt32.self)
            $0.storeBytes(of: counter.bigEndian, toByteOffset: 4, as: UInt64.self)
        }
        return bytes
    }

    static func aad(_ type: FrameType, _ flags: FrameFlags, _ extra: UnsafeRawBufferPointer) -> [UInt8] {
        var a: [UInt8] = [0x46, 0x45, 0x52, 0x59, type.rawValue, UInt8(flags.rawValue >> 8), UInt8(flags.rawValue & 0xFF)]
        a.append(contentsOf: extra)
        return a
    }
}

/// One AES-256-GCM key in an OpenSSL EVP context, for sealing or opening in place. The
/// key is set once; each frame sets only its nonce. Not thread-safe: one per direction of
/// a connection, used by one thread at a time.
final class GCMContext {
    private let context: OpaquePointer
    private let encrypting: Bool

    init(key: SymmetricKey, encrypting: Bool) {
        context = EVP_CIPHER_CTX_new()!
        self.encrypting = encrypting
        key.withUnsafeBytes { k in
            let raw = k.bindMemory(to: UInt8.self).baseAddress
            let ok = encrypting ? EVP_EncryptInit_ex(context, EVP_aes_256_gcm(), nil, raw, nil)
                                : EVP_DecryptInit_ex(context, EVP_aes_256_gcm(), nil, raw, nil)
            precondition(ok == 1, "AES-256-GCM is not available in libcrypto")
        }
    }

    deinit { EVP_CIPHER_CTX_free(context) }

    /// Encrypts `input` into `output` (same length; they may be the same memory) and writes
    /// the 16-byte tag into `tag`.
    func seal(nonce: [UInt8], aad: [UInt8], input: UnsafeRawBufferPointer, output: UnsafeMutableRawBufferPointer,
              tag: UnsafeMutableRawBufferPointer) {
        precondition(encrypting && output.count >= input.count && tag.count >= FrameSeal.tagByteCount)
        var n: Int32 = 0
        var ok = EVP_EncryptInit_ex(context, nil, nil, nil, nonce)
        ok &= EVP_EncryptUpdate(context, nil, &n, aad, Int32(aad.count))
        if input.count > 0 {
            ok &= EVP_EncryptUpdate(context, output.baseAddress!.assumingMemoryBound(to: UInt8.self), &n,
                                    input.baseAddress!.assumingMemoryBound(to: UInt8.self), Int32(input.count))
        }
        var scratch = [UInt8](repeating: 0, count: 16)
        ok &= EVP_EncryptFinal_ex(context, &scratch, &n)
        ok &= EVP_CIPHER_CTX_ctrl(context, EVP_CTRL_GCM_GET_TAG, Int32(FrameSeal.tagByteCount), tag.baseAddress)
        precondition(ok == 1, "AES-256-GCM sealing failed")
    }

    /// Decrypts `buffer` in place if `tag` authenticates it with `aad`; false (and the
    /// buffer's content undefined) otherwise.
    func open(nonce: [UInt8], aad: [UInt8], buffer: UnsafeMutableRawBufferPointer, tag: UnsafeRawBufferPointer) -> Bool {
        precondition(!encrypting && tag.count == FrameSeal.tagByteCount)
        var n: Int32 = 0
        var ok = EVP_DecryptInit_ex(context, nil, nil, nil, nonce)
        ok &= EVP_DecryptUpdate(context, nil, &n, aad, Int32(aad.count))
        if buffer.count > 0 {
            let p = buffer.baseAddress!.assumingMemoryBound(to: UInt8.self)
            ok &= EVP_DecryptUpdate(context, p, &n, p, Int32(buffer.count))
        }
        ok &= EVP_CIPHER_CTX_ctrl(context, EVP_CTRL_GCM_SET_TAG, Int32(FrameSeal.tagByteCount), UnsafeMutableRawPointer(mutating: tag.baseAddress))
        guard ok == 1 else { return false }
        var scratch = [UInt8](repeating: 0, count: 16)
        return EVP_DecryptFinal_ex(context, &scratch, &n) == 1
    }
}

/// Seals the frames one connection sends: one sending thread at a time, the caller
/// serialises (the frame connection's write lock).
///
/// AES-256-GCM through OpenSSL's EVP interface into a buffer the sealer keeps, so a chunk
/// costs one pass of AES-GCM and no allocation (swift-crypto's `AES.GCM.seal` returns a
/// new buffer each call, and joining ciphertext and tag copied the chunk once more: about
/// 1 CPU-second per GiB at the source on this project's machine).
// `counter`, `output`, `tag` and the context are used under the caller's lock (see
// above); `connection` is immutable.
public final class FrameSealer: @unchecked Sendable {
    private let gcm: GCMContext
    private let connection: UInt32
    private var counter: UInt64 = 0
    private var output = UnsafeMutableRawBufferPointer(start: nil, count: 0)
    private let tag = UnsafeMutableRawBufferPointer.allocate(byteCount: FrameSeal.tagByteCount, alignment: 16)

    public init(key: SymmetricKey, connection: UInt32) {
        gcm = GCMContext(key: key, encrypting: true)
        self.connection = connection
    }

    deinit {
        output.deallocate()
        tag.deallocate()
    }

    /// Ciphertext followed by the tag.
    public func seal(_ type: FrameType, _ flags: FrameFlags, header extra: UnsafeRawBufferPointer = UnsafeRawBufferPointer(start: nil, count: 0),
                     _ plaintext: UnsafeRawBufferPointer) -> Data {
        seal(type, flags, header: extra, plaintext) { ciphertext, tag in Data(ciphertext) + Data(tag) }
    }

    /// Seals and hands ciphertext and tag to `body` where they lie (the sealer's own
    /// buffers, valid until the next call).
    public func seal<R>(_ type: FrameType, _ flags: FrameFlags, header extra: UnsafeRawBufferPointer = UnsafeRawBufferPointer(start: nil, count: 0),
                        _ plaintext: UnsafeRawBufferPointer,
                        _ body: (_ ciphertext: UnsafeRawBufferPointer, _ tag: UnsafeRawBufferPointer) -> R) -> R {
        if output.count < plaintext.count {
            output.deallocate()
            output = .allocate(byteCount: max(plaintext.count, 4096), alignment: 64)
        }
        let nonce = FrameSeal.nonceBytes(connection, counter)
        counter += 1
        let ciphertext = UnsafeMutableRawBufferPointer(rebasing: output[..<plaintext.count])
        gcm.seal(nonce: nonce, aad: FrameSeal.aad(type, flags, extra), input: plaintext, output: ciphertext, tag: tag)
        return body(UnsafeRawBufferPointer(ciphertext), UnsafeRawBufferPointer(tag))
    }
}

/// Opens the frames one connection receives, in order: used by the connection's receiving
/// thread (one at a time, each starting after the previous one's last frame).
// `counter` and the context belong to that receiving thread; `connection` is immutable.
public final class FrameOpener: @unchecked Sendable {
    private let gcm: GCMContext
    private let connection: UInt32
    private var counter: UInt64 = 0

    public init(key: SymmetricKey, connection: UInt32) {
        gcm = GCMContext(key: key, encrypting: false)
        self.connection = connection
    }

    /// The plaintext of `sealed` (ciphertext and tag), or an error if it is not the next
    /// frame this connection's peer sealed.
    public func open(_ type: FrameType, _ flags: FrameFlags, header extra: UnsafeRawBufferPointer = UnsafeRawBufferPointer(start: nil, count: 0),
                     _ sealed: UnsafeRawBufferPointer) throws(SecurityError) -> Data {
        guard sealed.count >= FrameSeal.tagByteCount else {
            throw .sealedFrameRejected("\(type) frame of \(sealed.count) bytes is shorter than its tag")
        }
        let split = sealed.count - FrameSeal.tagByteCount
        var plain = [UInt8](UnsafeRawBufferPointer(rebasing: sealed[..<split]))
        let result: Result<Void, SecurityError> = plain.withUnsafeMutableBytes { buffer in
            Result { () throws(SecurityError) in
                try openInPlace(type, flags, header: extra, buffer, tag: UnsafeRawBufferPointer(rebasing: sealed[split...]))
            }
        }
        try result.get()
        return Data(plain)
    }

    /// Decrypts `buffer` (a data chunk's ciphertext where it was received) in place, or
    /// throws if it is not the next frame this connection's peer sealed.
    public func openInPlace(_ type: FrameType, _ flags: FrameFlags, header extra: UnsafeRawBufferPointer = UnsafeRawBufferPointer(start: nil, count: 0),
                            _ buffer: UnsafeMutableRawBufferPointer, tag: UnsafeRawBufferPointer) throws(SecurityError) {
        guard tag.count == FrameSeal.tagByteCount else {
            throw .sealedFrameRejected("\(type) frame with a tag of \(tag.count) bytes")
        }
        guard gcm.open(nonce: FrameSeal.nonceBytes(connection, counter), aad: FrameSeal.aad(type, flags, extra), buffer: buffer, tag: tag) else {
            throw .sealedFrameRejected("\(type) frame \(counter) failed authentication (tampered, replayed, reordered or under another key)")
        }
        counter += 1
    }
}
