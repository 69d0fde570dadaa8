import FerryIO
import FerryInterfaces
import FerryTransport
import FerryWire
import Foundation
import Logging

/// Where the source can reach the destination's daemon again when the control
/// connection's path fails: every NIC pair the destination's `accept` allows (the NIC
/// that just failed last), then the `--to` address by the routing table.
struct ControlPaths: Sendable {
    let remote: [NetworkInterface]
    let port: UInt16
    let host: String
    let selection: NICSelection
    let speeds: [String: UInt64]
    let session: String
    let bindKey: [UInt8]
    let security: SessionSecurity
    let connectTimeout: Duration
    let userTimeout: Duration
    let logger: Logger

    /// The paths to try, in order: pairs not over `avoid` first.
    func candidates(avoid: String?) -> [NICPair?] {
        let local = InterfaceDiscovery.list(speeds: speeds)
        let pairs = NICMatcher.match(local: local, remote: remote, localSelection: selection).pairs
            .filter { ChannelManager.carrier($0.localInterface) }
        let ordered = pairs.filter { $0.localInterface != avoid } + pairs.filter { $0.localInterface == avoid }
        return ordered.map { $0 } + [nil]
    }

    /// One try (the link's `attempt`-th in this outage): a connection over the next path,
    /// `rejoin` with the session's proof, the destination's `rejoined` checked, sealed as
    /// connection `generation`.
    func rejoin(generation: UInt32, received: UInt64, attempt: Int, avoid: String?) throws -> ControlLink.Rejoined {
        let paths = candidates(avoid: avoid)
        let pair = paths[attempt % paths.count]
        let socket: Socket
        let interface: String?
        let description: String
        if let pair {
            socket = try ChannelManager.connect(over: pair, port: port, timeout: connectTimeout, logger: logger)
            interface = pair.localInterface
            description = "\(pair.localInterface) \(pair.localAddress) -> \(pair.remoteAddress)"
        } else {
            socket = try Socket.connectTCP(host: host, port: port, timeout: connectTimeout)
            interface = socket.localAddress.flatMap { InterfaceDiscovery.name(holding: $0) }
            description = "\(interface ?? "?") \(socket.localAddress ?? "?") -> \(host)"
        }
        do {
            socket.setUserTimeout(userTimeout)
            let connection = FrameConnection(socket: socket)
            try connection.send(.rejoin, RejoinMessage(
                version: ProtocolVersion.current, session: session, generation: generation, received: received,
                interface: interface ?? "?",
                proof: ControlRejoin.proof(bindKey: bindKey, session: session, generation: generation, received: received, role: .rejoin)))
            socket.setReceiveTimeout(.seconds(3))
            let answer = try connection.expect(.rejoined, as: RejoinedMessage.self)
            guard answer.generation == generation,
                  ControlRejoin.verify(proof: answer.proof, bindKey: bindKey, session: session, generation: generation,
                                       received: answer.received, role: .rejoined) else {
                throw SecurityError.authenticationFailed("the answer to the rejoin over \(description) does not prove the session key")
            }
            security.secureControl(connection, as: .source, generation: generation)
            return .init(connection: connection, peerReceived: answer.received, interface: interface, path: description)
        } catch {
            socket.close()
            throw error
        }
    }
}

extension SourceMigration {
    /// Step (no phase of its own): the control connection becomes a link that moves to
    /// another NIC pair when its own fails (protocol v2; with a v1 destination it fails
    /// with its connection, as before). Frames from here on are numbered.
    func openControlLink(_ control: FrameConnection, _ session: NegotiatedSession) -> ControlLink {
        let movable = session.welcome.version >= ProtocolVersion.movableControl
        var linkOptions = ControlLink.Options(movable: movable)
        linkOptions.rejoinTimeout = options.linkTimeout
        linkOptions.stallTimeout = options.stallTimeout
        linkOptions.carrier = { ChannelManager.carrier($0) }
        let paths = ControlPaths(
            remote: session.accept.interfaces.map(\.networkInterface),
            port: session.accept.dataPort == 0 ? options.port : session.accept.dataPort,
            host: options.host, selection: options.nics, speeds: options.nicSpeeds, session: session.accept.session,
            bindKey: session.bindKey, security: session.security,
            connectTimeout: min(options.connectTimeout, .seconds(1)), userTimeout: options.deadChannelTimeout, logger: logger)
        let local = control.socket.localAddress
        let interface = local.flatMap { InterfaceDiscovery.name(holding: $0) }
        let path = "\(interface ?? "?") \(local ?? "?") -> \(options.host)"
        let clock = track.clock
        let link = ControlLink(control, role: .source, options: linkOptions, interface: interface, path: path,
                               rejoiner: { try paths.rejoin(generation: $0, received: $1, attempt: $2, avoid: $3) },
                               note: { [linkNotes] text in linkNotes.withLock { $0.append((clock.elapsed, text)) } })
        if !movable {
            track.note("the destination speaks protocol v\(session.welcome.version): the control connection cannot move to another NIC")
        }
        self.link = link
        interrupt.attach(link)
        return link
    }

    /// The link's notes (a move to another NIC), into the journal at the time they happened.
    func takeLinkNotes() {
        for (at, text) in linkNotes.withLock({ notes in defer { notes = [] }; return notes }) {
            track.note(text, at: at)
        }
    }
}
