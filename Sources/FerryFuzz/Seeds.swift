import FerryWire
import Foundation

/// The seed corpus: valid inputs for every path of the harness, so the fuzzer starts from
/// real frames and genuine proofs instead of having to find checksums and JSON keys.
enum Seeds {
    static func all() -> [(name: String, bytes: [UInt8])] {
        var seeds: [(String, [UInt8])] = []
        for (i, frame) in frames.enumerated() {
            seeds.append(("frame-\(frame.type)-\(i)", frame.encoded()))
            // The same payload for the checksum-free path: first byte picks the type.
            let types = FrameType.allCases.filter { $0 != .invalid }
            seeds.append(("typed-\(frame.type)-\(i)", [UInt8(types.firstIndex(of: frame.type)!)] + frame.payload))
        }
        seeds.append(("stream-control", control.flatMap { $0.encoded() }))
        seeds.append(("stream-data", dataChannel.flatMap { $0.encoded() }))
        seeds.append(("stream-truncated", Array(control.flatMap { $0.encoded() }.dropLast(5))))
        seeds.append(("payload-hello", Fixtures.helloPayload))
        seeds.append(("payload-welcome", Fixtures.welcomePayload))
        seeds.append(("payload-auth", Fixtures.authPayload))
        seeds.append(("keyfile", Array(("# cluster key, rotated\n" + KeyRing(keys: [Fixtures.key, Fixtures.strangerKey]).fileText).utf8)))
        seeds.append(("sealed-control", sealedControl))
        seeds.append(("sealed-data", sealedData))
        seeds.append(("frame-sealed-control", Frame(type: .status, flags: .sealed, payload: sealedControl).encoded()))
        seeds.append(("frame-sealed-data", Frame(type: .data, flags: .sealed, payload: sealedData).encoded()))
        for (name, bytes) in StateFileFuzzing.seeds { seeds.append(("state-\(name)", bytes)) }
        return seeds
    }

    /// Writes every seed as a file in `directory` (created if needed); returns how many.
    static func write(to directory: String) throws -> Int {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let seeds = all()
        for seed in seeds {
            try Data(seed.bytes).write(to: URL(fileURLWithPath: directory).appendingPathComponent("seed-\(seed.name)"))
        }
        return seeds.count
    }

    static let sha = Hex.encode((0..<32).map { UInt8($0) })
    static let spec = VMSpec(name: "demo", memoryMiB: 256, cpus: 2,
                             kernel: BootFile(name: "vmlinuz", byteCount: 8_000_000, sha256: sha),
                             initrd: BootFile(name: "initrd.img", byteCount: 3_000_000, sha256: String(sha.reversed())),
                             append: "console=ttyS0 ferry.fill=64", accelerator: .tcg,
                             machine: "pc-i440fx-7.2", cpuModel: "max", ramPadKiB: 512)

    static var control: [Frame] {
        [
            Frame(type: .hello, payload: Fixtures.helloPayload),
            Frame(type: .welcome, payload: Fixtures.welcomePayload),
            Frame(type: .auth, payload: Fixtures.authPayload),
            ControlCoding.frame(.offer, OfferMessage(spec: spec, streams: StreamPlan(multifdChannels: 2), sourceHost: "a")),
            ControlCoding.frame(.accept, AcceptMessage(
                session: Fixtures.session, bindKey: "", missingFiles: [sha],
                interfaces: [InterfaceMessage(name: "eth0", addresses: ["10.0.0.2/24", "fd00::2/64"],
                                              speedBitsPerSecond: 1_000_000_000, mtu: 1500, carrier: true)],
                dataPort: 7071)),
            Frame(type: .file, payload: FileChunkMessage(sha256: sha, offset: 1 << 20, bytes: Array("kernel".utf8)).encoded()),
            ControlCoding.frame(.ready, ReadyMessage(qemuVersion: "7.2.0")),
            ControlCoding.frame(.limit, LimitMessage(bytesPerSecond: 125_000_000)),
            ControlCoding.frame(.streamOpen, StreamOpenMessage(stream: 0)),
            ControlCoding.frame(.status, StatusMessage(text: "42% sent")),
            ControlCoding.frame(.streamEnd, StreamEndMessage(stream: 0, chunkCount: 12, byteCount: 3_000_000)),
            ControlCoding.frame(.loaded, LoadedMessage(receivedByteCount: 3_000_000)),
            ControlCoding.frame(.commit, CommitMessage()),
            ControlCoding.frame(.committed, CommittedMessage(ferryCPUSeconds: 0.25, qemuCPUSeconds: 1.5,
                                                            receivedByteCount: 3_000_000, ferryPeakRSSBytes: 40 << 20)),
        ]
    }

    static var dataChannel: [Frame] {
        let bindKey = Fixtures.sessionKeys.bind
        return [
            ControlCoding.frame(.bind, BindMessage(
                version: ProtocolVersion.current, session: Fixtures.session, channel: 1, interface: "eth0",
                proof: ChannelBinding.proof(bindKey: bindKey, session: Fixtures.session, channel: 1))),
            ControlCoding.frame(.bound, BoundMessage(
                channel: 1, proof: ChannelBinding.proof(bindKey: bindKey, session: Fixtures.session, channel: 1, role: .bound))),
            dataFrame(stream: 0, sequence: 0, offset: 0, bytes: Array(repeating: 0xAB, count: 64)),
            dataFrame(stream: 1, sequence: 3, offset: 4096, bytes: Array("QEVM".utf8)),
            Frame(type: .ack, payload: AckMessage(entries: [.init(stream: 0, nextSequence: 1), .init(stream: 1, nextSequence: 4)]).encoded()),
            ControlCoding.frame(.rejoin, RejoinMessage(
                version: ProtocolVersion.current, session: Fixtures.session, generation: 1, received: 7, interface: "eth1",
                proof: ControlRejoin.proof(bindKey: bindKey, session: Fixtures.session, generation: 1, received: 7, role: .rejoin))),
            ControlCoding.frame(.rejoined, RejoinedMessage(
                generation: 1, received: 12,
                proof: ControlRejoin.proof(bindKey: bindKey, session: Fixtures.session, generation: 1, received: 12, role: .rejoined))),
            ControlCoding.frame(.received, ReceivedMessage(received: 12)),
        ]
    }

    static var frames: [Frame] {
        control + dataChannel + [
            ControlCoding.frame(.hello, HelloMessage(software: "ferry 0.1", host: "insecure-source")),
            ControlCoding.frame(.welcome, WelcomeMessage(version: 1, software: "ferry 0.1", host: "insecure-destination")),
            ControlCoding.frame(.error, ErrorMessage(code: .authenticationFailed, message: "the source did not prove it holds the key")),
            ControlCoding.frame(.error, ErrorMessage(code: .busy, message: "busy")),
            ControlCoding.frame(.abort, AbortMessage(reason: "operator")),
            ControlCoding.frame(.limit, LimitMessage(bytesPerSecond: nil)),
            ControlCoding.frame(.offer, OfferMessage(
                spec: VMSpec(name: "small", memoryMiB: 64, cpus: 1, kernel: BootFile(name: "k", byteCount: 1, sha256: sha),
                             initrd: nil, append: "", accelerator: .kvm, machine: "pc", cpuModel: "host"),
                streams: StreamPlan(multifdChannels: 0), sourceHost: "b")),
            Frame(type: .ack, payload: AckMessage(entries: []).encoded()),
            Frame(type: .file, payload: FileChunkMessage(sha256: sha, offset: 0, bytes: []).encoded()),
            dataFrame(stream: 2, sequence: 0, offset: 0, bytes: []),
        ]
    }

    static func dataFrame(stream: UInt32, sequence: UInt64, offset: UInt64, bytes: [UInt8]) -> Frame {
        var payload = [UInt8](repeating: 0, count: DataChunkHeader.byteCount)
        payload.withUnsafeMutableBytes { DataChunkHeader(stream: stream, sequence: sequence, offset: offset).write(into: $0) }
        return Frame(type: .data, payload: payload + bytes)
    }

    /// A status message sealed as the first frame of the control connection.
    static var sealedControl: [UInt8] {
        let plain = ControlCoding.encode(StatusMessage(text: "sealed"))
        let sealer = FrameSealer(key: Fixtures.sessionKeys.controlToDestination, connection: FrameSeal.controlConnection)
        return plain.withUnsafeBytes { Array(sealer.seal(.status, .sealed, $0)) }
    }

    /// A data chunk sealed as the first frame of data channel 0: clear sub-header, ciphertext, tag.
    static var sealedData: [UInt8] {
        let frame = dataFrame(stream: 0, sequence: 0, offset: 0, bytes: Array(repeating: 0x5C, count: 48))
        let sealer = FrameSealer(key: Fixtures.sessionKeys.dataToDestination, connection: 0)
        let header = Array(frame.payload[..<DataChunkHeader.byteCount])
        let body = Array(frame.payload[DataChunkHeader.byteCount...])
        let sealed = header.withUnsafeBytes { h in body.withUnsafeBytes { b in sealer.seal(.data, .sealed, header: h, b) } }
        return header + Array(sealed)
    }
}
