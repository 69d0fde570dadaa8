import Foundation
import Testing
@testable import FerryWire

@Suite("Protocol messages")
struct MessageTests {
    static let kernel = BootFile(name: "vmlinuz", byteCount: 123, sha256: String(repeating: "ab", count: 32))
    static let spec = VMSpec(name: "vm-1", memoryMiB: 512, cpus: 2, kernel: kernel, initrd: nil, append: "console=ttyS0",
                             accelerator: .tcg, machine: "pc-i440fx-7.2", cpuModel: "qemu64")

    @Test("control messages survive JSON framing")
    func controlRoundTrip() throws {
        let offer = OfferMessage(spec: Self.spec, streams: StreamPlan(multifdChannels: 2), sourceHost: "a")
        let frame = ControlCoding.frame(.offer, offer)
        var decoder = FrameDecoder()
        decoder.feed(frame.encoded())
        let back = try #require(try decoder.next())
        #expect(try ControlCoding.decode(OfferMessage.self, from: back) == offer)
        #expect(offer.streams.streamCount == 3)
    }

    @Test("a control payload that is not the message is a clear error")
    func malformedControl() {
        let frame = Frame(type: .offer, payload: Array(#"{"spec": 5}"#.utf8))
        #expect(throws: WireError.self) { try ControlCoding.decode(OfferMessage.self, from: frame) }
    }

    @Test("resolve carries a typed decision; one this host does not know is refused, not read as a question")
    func resolveDecision() throws {
        let ask = ResolveMessage(session: "s1", vm: "vm1", decision: nil)
        let commit = ResolveMessage(session: "s1", vm: "vm1", decision: .commit)
        for message in [ask, commit] {
            #expect(try ControlCoding.decode(ResolveMessage.self, from: ControlCoding.frame(.resolve, message)) == message)
        }
        // The wire form is the one older peers sent: a plain string.
        #expect(String(decoding: ControlCoding.encode(commit), as: UTF8.self).contains(#""decision":"commit""#))
        let future = Frame(type: .resolve, payload: Array(#"{"session": "s1", "vm": "vm1", "decision": "maybe"}"#.utf8))
        #expect(throws: WireError.self) { try ControlCoding.decode(ResolveMessage.self, from: future) }
    }

    @Test("disks in the spec and the offer; a stream of a kind this host does not know is refused, not read as QEMU's")
    func disksAndStreamKinds() throws {
        var spec = Self.spec
        spec.disks = [DiskSpec(path: "/srv/vm1.qcow2", format: .qcow2, virtualSizeBytes: 1 << 30, shared: false),
                      DiskSpec(path: "/nfs/vm1.raw", format: .raw, virtualSizeBytes: 1 << 20, shared: true)]
        let offer = OfferMessage(spec: spec, streams: StreamPlan(multifdChannels: 0), sourceHost: "a", sharedDiskTokens: [nil, "ab"])
        #expect(try ControlCoding.decode(OfferMessage.self, from: ControlCoding.frame(.offer, offer)) == offer)
        // A spec from before disks reads as a VM without disks.
        let old = try JSONEncoder().encode(Self.spec)
        #expect(try JSONDecoder().decode(VMSpec.self, from: old).disks.isEmpty)
        let open = StreamOpenMessage(stream: StreamID.firstTwoWay, kind: .nbd, target: "0", priority: 1)
        #expect(try ControlCoding.decode(StreamOpenMessage.self, from: ControlCoding.frame(.streamOpen, open)) == open)
        let future = Frame(type: .streamOpen, payload: Array(#"{"stream": 65536, "kind": "teleport"}"#.utf8))
        #expect(throws: WireError.self) { try ControlCoding.decode(StreamOpenMessage.self, from: future) }
        // Halves: bit 31 names the reverse one; two-way numbers have their own range.
        #expect(StreamID.reverse(65536) == 0x8001_0000 && StreamID.isReverse(0x8001_0000) && StreamID.stream(ofHalf: 0x8001_0000) == 65536)
        #expect(!StreamID.isTwoWay(0) && StreamID.isTwoWay(65536) && !StreamID.isTwoWay(65536 + 4096))
    }

    @Test("ack round trip and malformed acks")
    func ack() throws {
        let ack = AckMessage(entries: [.init(stream: 0, nextSequence: 7), .init(stream: 3, nextSequence: 1 << 40)])
        #expect(try AckMessage.decode(ack.encoded()) == ack)
        #expect(throws: WireError.self) { try AckMessage.decode([0, 0]) }
        var bad = ack.encoded()
        bad.removeLast()
        #expect(throws: WireError.self) { try AckMessage.decode(bad) }
        #expect(throws: WireError.self) { try AckMessage.decode([0xff, 0xff, 0xff, 0xff]) }
    }

    @Test("data chunk header round trip")
    func chunkHeader() throws {
        let header = DataChunkHeader(stream: 2, sequence: 99, offset: 1 << 33)
        var bytes = [UInt8](repeating: 0, count: DataChunkHeader.byteCount)
        bytes.withUnsafeMutableBytes { header.write(into: $0) }
        #expect(try bytes.withUnsafeBytes { try DataChunkHeader.parse($0) } == header)
        #expect(throws: WireError.self) { try [UInt8](repeating: 0, count: 5).withUnsafeBytes { try DataChunkHeader.parse($0) } }
    }

    @Test("boot file pieces round trip")
    func fileChunk() throws {
        let piece = FileChunkMessage(sha256: Self.kernel.sha256, offset: 4096, bytes: [1, 2, 3])
        #expect(try FileChunkMessage.decode(piece.encoded()) == piece)
        #expect(throws: WireError.self) { try FileChunkMessage.decode([1, 2, 3]) }
    }

    @Test("version negotiation picks the highest common version")
    func negotiation() {
        #expect(ProtocolVersion.negotiate(peerMin: 1, peerMax: 1) == 1)
        #expect(ProtocolVersion.negotiate(peerMin: 1, peerMax: 2) == 2)
        #expect(ProtocolVersion.negotiate(peerMin: 1, peerMax: 9) == 8)
        #expect(ProtocolVersion.negotiate(peerMin: 3, peerMax: 9) == 8)
        #expect(ProtocolVersion.negotiate(peerMin: 6, peerMax: 6) == 6)
        #expect(ProtocolVersion.negotiate(peerMin: 9, peerMax: 10) == nil)
        #expect(ProtocolVersion.negotiate(peerMin: 0, peerMax: 0) == nil)
        #expect(ProtocolVersion.movableControl == 2 && ProtocolVersion.current >= ProtocolVersion.movableControl)
        #expect(ProtocolVersion.twoWayStreams == 3 && ProtocolVersion.current >= ProtocolVersion.twoWayStreams)
        #expect(ProtocolVersion.guestNICs == 4 && ProtocolVersion.current >= ProtocolVersion.guestNICs)
        #expect(ProtocolVersion.hostQueries == 5 && ProtocolVersion.current >= ProtocolVersion.hostQueries)
        #expect(ProtocolVersion.postcopy == 6 && ProtocolVersion.postcopyResume == 7 && ProtocolVersion.current >= ProtocolVersion.postcopyResume)
    }

    @Test("rejoin proofs: only the key holder can continue a session's control connection, and the counts cannot be changed")
    func rejoinProofs() {
        let key = [UInt8](repeating: 7, count: 32)
        let proof = ControlRejoin.proof(bindKey: key, session: "s1", generation: 2, received: 40, role: .rejoin)
        #expect(ControlRejoin.verify(proof: proof, bindKey: key, session: "s1", generation: 2, received: 40, role: .rejoin))
        #expect(!ControlRejoin.verify(proof: proof, bindKey: key, session: "s1", generation: 3, received: 40, role: .rejoin))
        #expect(!ControlRejoin.verify(proof: proof, bindKey: key, session: "s1", generation: 2, received: 41, role: .rejoin))
        #expect(!ControlRejoin.verify(proof: proof, bindKey: key, session: "s2", generation: 2, received: 40, role: .rejoin))
        #expect(!ControlRejoin.verify(proof: proof, bindKey: key, session: "s1", generation: 2, received: 40, role: .rejoined))
        #expect(!ControlRejoin.verify(proof: proof, bindKey: [UInt8](repeating: 8, count: 32), session: "s1", generation: 2,
                                      received: 40, role: .rejoin))
        // Control connections seal under numbers data channels never reach.
        #expect(ControlRejoin.sealNumber(generation: 0) == FrameSeal.controlConnection)
        #expect(ControlRejoin.sealNumber(generation: ControlRejoin.maximumGeneration) == 0xFFFF_0000)
    }

    @Test("channel binding proofs: only the key holder can bind")
    func binding() {
        let key = [UInt8](repeating: 7, count: 32)
        let proof = ChannelBinding.proof(bindKey: key, session: "s1", channel: 3)
        #expect(ChannelBinding.verify(proof: proof, bindKey: key, session: "s1", channel: 3))
        #expect(!ChannelBinding.verify(proof: proof, bindKey: key, session: "s1", channel: 4))
        #expect(!ChannelBinding.verify(proof: proof, bindKey: key, session: "s2", channel: 3))
        #expect(!ChannelBinding.verify(proof: proof, bindKey: [UInt8](repeating: 8, count: 32), session: "s1", channel: 3))
        #expect(!ChannelBinding.verify(proof: "00", bindKey: key, session: "s1", channel: 3))
    }

    @Test("VM names", arguments: [("ok-name_1.2", true), ("", false), ("../etc", false), ("-x", false), ("a b", false),
                                  (String(repeating: "x", count: 65), false), ("vm", true)])
    func names(name: String, valid: Bool) {
        #expect((VMSpec.validateName(name) == nil) == valid)
    }

    @Test("hex")
    func hex() {
        #expect(Hex.encode([0, 1, 0xab, 0xff]) == "0001abff")
        #expect(Hex.decode("0001ABff") == [0, 1, 0xab, 0xff])
        #expect(Hex.decode("abc") == nil)
        #expect(Hex.decode("zz") == nil)
        #expect(Hex.random(byteCount: 16).count == 32)
    }
}
