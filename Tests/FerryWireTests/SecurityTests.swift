import Crypto
import Foundation
import Testing
@testable import FerryWire

@Suite("Cluster keys")
struct ClusterKeyTests {
    func temporaryFile(_ text: String, mode: mode_t) throws -> String {
        let path = NSTemporaryDirectory() + "ferry-key-\(UUID().uuidString)"
        #expect(FileManager.default.createFile(atPath: path, contents: Data(text.utf8), attributes: [.posixPermissions: Int(mode)]))
        return path
    }

    @Test("a key file round-trips; several keys keep their order; ids are stable and differ")
    func roundTrip() throws {
        let ring = KeyRing(keys: [.generate(), .generate()])
        let parsed = try KeyRing.parse("# comment\n\n" + ring.fileText)
        #expect(parsed == ring)
        #expect(parsed.primary.id == ring.keys[0].id)
        #expect(ring.keys[0].id != ring.keys[1].id)
        #expect(ring.keys[0].id.count == 16)
        #expect(parsed.key(id: ring.keys[1].id) == ring.keys[1])
        #expect(parsed.key(id: "0000000000000000") == nil)
        // Windows line ends (a file edited on the wrong machine) read the same.
        #expect(try KeyRing.parse(ring.fileText.replacingOccurrences(of: "\n", with: "\r\n")) == ring)
    }

    @Test("bad key files are refused with the line and the reason", arguments: [
        ("", "no key"),
        ("ferry-cluster-key-v1 abcd\n", "64 hex digits"),
        ("ferry-cluster-key-v2 " + String(repeating: "a", count: 64), "line 1"),
        ("ferry-cluster-key-v1 " + String(repeating: "g", count: 64), "64 hex digits"),
        ("# ok\nferry-cluster-key-v1\n", "line 2"),
    ])
    func badFiles(text: String, why: String) {
        #expect(throws: SecurityError.self) { try KeyRing.parse(text) }
        do { _ = try KeyRing.parse(text) } catch { #expect("\(error)".contains(why), "\(error)") }
    }

    @Test("a key file others may read is refused; a missing one says how to make one")
    func permissions() throws {
        let text = KeyRing(keys: [.generate()]).fileText
        let open = try temporaryFile(text, mode: 0o644)
        defer { unlink(open) }
        do {
            _ = try KeyRing.load(path: open)
            Issue.record("a world-readable key file was accepted")
        } catch {
            #expect("\(error)".contains("chmod 600"))
        }
        let closed = try temporaryFile(text, mode: 0o600)
        defer { unlink(closed) }
        #expect(try KeyRing.load(path: closed).keys.count == 1)
        do {
            _ = try KeyRing.load(path: "/nonexistent/ferry.key")
            Issue.record("a missing key file was accepted")
        } catch {
            #expect("\(error)".contains("ferry keygen"))
        }
    }
}

@Suite("Handshake and sealing")
struct SealingTests {
    let key = ClusterKey.generate()
    let hello = Array(#"{"host":"a","nonce":"x"}"#.utf8)

    @Test("each side's proof verifies only under the same key, the same hello, nonce and key share")
    func proofs() {
        let nonce = Handshake.newNonce()
        let share = EphemeralKey().share
        func proof(_ k: ClusterKey, _ h: [UInt8], _ n: String, _ sh: String, _ v: UInt16) -> String {
            Handshake.destinationProof(key: k, helloPayload: h, destinationNonce: n, destinationShare: sh, version: v)
        }
        let p = proof(key, hello, nonce, share, 1)
        #expect(Handshake.equal(p, proof(key, hello, nonce, share, 1)))
        #expect(!Handshake.equal(p, proof(.generate(), hello, nonce, share, 1)))
        // A recorded proof is worthless against a fresh nonce (replay), another hello, a
        // swapped key share (a man in the middle) or another version.
        #expect(!Handshake.equal(p, proof(key, hello, Handshake.newNonce(), share, 1)))
        #expect(!Handshake.equal(p, proof(key, hello + [0x20], nonce, share, 1)))
        #expect(!Handshake.equal(p, proof(key, hello, nonce, EphemeralKey().share, 1)))
        #expect(!Handshake.equal(p, proof(key, hello, nonce, share, 2)))
        let proof = p
        let welcome = Array("welcome".utf8)
        let s = Handshake.sourceProof(key: key, helloPayload: hello, welcomePayload: welcome)
        #expect(!Handshake.equal(s, Handshake.sourceProof(key: key, helloPayload: hello, welcomePayload: welcome + [1])))
        #expect(!Handshake.equal(s, proof))
        #expect(Handshake.validNonce(nonce) && !Handshake.validNonce("abcd") && !Handshake.validNonce(nonce + "zz"))
    }

    @Test("both sides agree on the X25519 secret; session keys are fresh for every exchange and differ per direction and purpose")
    func sessionKeys() throws {
        let s = EphemeralKey(), d = EphemeralKey()
        let secret = try s.agree(with: d.share)
        #expect(try d.agree(with: s.share) == secret)
        #expect(throws: SecurityError.self) { try s.agree(with: "abcd") }
        #expect(throws: SecurityError.self) { try s.agree(with: String(repeating: "00", count: 32)) }
        let n1 = Handshake.newNonce(), n2 = Handshake.newNonce()
        let a = SessionKeys(key: key, sharedSecret: secret, sourceNonce: n1, destinationNonce: n2)
        let b = SessionKeys(key: key, sharedSecret: secret, sourceNonce: n1, destinationNonce: Handshake.newNonce())
        let c = SessionKeys(key: key, sharedSecret: try s.agree(with: EphemeralKey().share), sourceNonce: n1, destinationNonce: n2)
        func bytes(_ k: SymmetricKey) -> [UInt8] { k.withUnsafeBytes { Array($0) } }
        #expect(bytes(a.dataToDestination) == bytes(SessionKeys(key: key, sharedSecret: secret, sourceNonce: n1, destinationNonce: n2).dataToDestination))
        #expect(bytes(a.dataToDestination) != bytes(b.dataToDestination))
        #expect(bytes(a.dataToDestination) != bytes(c.dataToDestination), "the ephemeral secret counts")
        let all = [a.controlToDestination, a.controlToSource, a.dataToDestination, a.dataToSource].map(bytes) + [a.bind]
        #expect(Set(all).count == 5)
    }

    func seal(_ sealer: FrameSealer, _ text: String, header: [UInt8] = []) -> [UInt8] {
        header.withUnsafeBytes { h in Array(text.utf8).withUnsafeBytes { Array(sealer.seal(.data, [.sealed], header: h, $0)) } }
    }

    func open(_ opener: FrameOpener, _ sealed: [UInt8], header: [UInt8] = [], type: FrameType = .data) throws -> String {
        let plain = try header.withUnsafeBytes { h in try sealed.withUnsafeBytes { try opener.open(type, [.sealed], header: h, $0) } }
        return String(decoding: plain, as: UTF8.self)
    }

    @Test("sealed frames open in order; a flipped bit, a replay, a reorder, another channel, another key or a changed header fail")
    func sealing() throws {
        let k = SymmetricKey(size: .bits256)
        let tx = FrameSealer(key: k, connection: 3)
        let f0 = seal(tx, "first", header: [1, 2, 3])
        let f1 = seal(tx, "second")
        let f2 = seal(tx, "third")
        #expect(f0.count == 5 + FrameSeal.tagByteCount)
        #expect(!f0.starts(with: Array("first".utf8)), "the bytes are encrypted")

        let rx = FrameOpener(key: k, connection: 3)
        // A changed clear header (the chunk's stream, sequence, offset) fails.
        #expect(throws: SecurityError.self) { try open(rx, f0, header: [1, 2, 4]) }
        #expect(try open(rx, f0, header: [1, 2, 3]) == "first")
        // Replay of the frame just opened.
        #expect(throws: SecurityError.self) { try open(rx, f0, header: [1, 2, 3]) }
        // Reordering: the third before the second.
        #expect(throws: SecurityError.self) { try open(rx, f2) }
        // A flipped bit, in the ciphertext and in the tag.
        for index in [0, f1.count - 1] {
            var bad = f1
            bad[index] ^= 0x10
            #expect(throws: SecurityError.self) { try open(rx, bad) }
        }
        // A different frame type over the same bytes.
        #expect(throws: SecurityError.self) { try open(rx, f1, type: .ack) }
        #expect(try open(rx, f1) == "second")
        #expect(try open(rx, f2) == "third")

        // The same frames on another channel number, or under another key, do not open.
        #expect(throws: SecurityError.self) { try open(FrameOpener(key: k, connection: 4), f0, header: [1, 2, 3]) }
        #expect(throws: SecurityError.self) { try open(FrameOpener(key: SymmetricKey(size: .bits256), connection: 3), f0, header: [1, 2, 3]) }
        // Shorter than a tag.
        #expect(throws: SecurityError.self) { try open(FrameOpener(key: k, connection: 3), [1, 2, 3]) }
    }

    @Test("the sealing is standard AES-256-GCM: swift-crypto opens what the OpenSSL sealer made, and the reverse")
    func interoperates() throws {
        let k = SymmetricKey(size: .bits256)
        let text = Array("a chunk of guest memory".utf8)
        let header: [UInt8] = [9, 8, 7]
        let sealed = seal(FrameSealer(key: k, connection: 5), String(decoding: text, as: UTF8.self), header: header)
        let nonce = try AES.GCM.Nonce(data: FrameSeal.nonceBytes(5, 0))
        let aad = header.withUnsafeBytes { FrameSeal.aad(.data, [.sealed], $0) }
        let box = try AES.GCM.SealedBox(nonce: nonce, ciphertext: sealed.dropLast(16), tag: sealed.suffix(16))
        #expect(Array(try AES.GCM.open(box, using: k, authenticating: aad)) == text)
        let theirs = try AES.GCM.seal(text, using: k, nonce: nonce, authenticating: aad)
        #expect(try open(FrameOpener(key: k, connection: 5), Array(theirs.ciphertext) + Array(theirs.tag), header: header)
                == String(decoding: text, as: UTF8.self))
    }

    @Test("the same chunk sealed on two channels never repeats ciphertext (distinct nonces)")
    func noNonceReuse() {
        let k = SymmetricKey(size: .bits256)
        let a = seal(FrameSealer(key: k, connection: 0), "same chunk")
        let b = seal(FrameSealer(key: k, connection: 1), "same chunk")
        #expect(a != b)
    }
}
