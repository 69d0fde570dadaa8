import FerryIO
import FerryInterfaces
import FerryTransport
import FerryWire
import Foundation
import Logging

/// Opens and keeps the data channels of one migration, the way SMB Multichannel does:
/// several connections per NIC pair (so that more than one core works, as RSS spreads a
/// NIC's queues), each bound to the session; a NIC that loses carrier has its channels
/// failed over at once; a NIC that comes back gets channels again.
///
/// The migration's thread opens the first channels and stops it; its "ferry-nics" thread
/// watches carrier and starts a short-lived "ferry-reopen" thread per NIC that comes back.
// Every `var` is under `lock`; the rest is immutable.
final class ChannelManager: @unchecked Sendable {
    struct Plan: Sendable {
        var pairs: [NICPair]
        var port: UInt16
        var session: String
        /// The protocol version the handshake chose; each `bind` says it again.
        var version: UInt16
        var bindKey: [UInt8]
        var security: SessionSecurity
        var channelsPerPair: Int
        var connectTimeout: Duration
        var deadChannelTimeout: Duration
        /// At most this much unsent in each channel's socket (nil: the kernel's autotuned
        /// buffer): with postcopy, so that a requested page waits behind little bulk data.
        var unsentLowWater: Int? = nil
    }

    private let plan: Plan
    private let dataPath: SourceDataPath
    private let logger: Logger
    private let note: @Sendable (String) -> Void
    private let lock = Monitor()
    private var nextChannelID = 0
    private var carrier: [String: Bool] = [:]
    private var reconnecting = Set<String>()
    private var lastAttempt: [String: ContinuousClock.Instant] = [:]
    private var stopped = false

    init(plan: Plan, dataPath: SourceDataPath, logger: Logger, note: @escaping @Sendable (String) -> Void) {
        self.plan = plan
        self.dataPath = dataPath
        self.logger = logger
        self.note = note
    }

    /// Opens every pair's channels. Returns the errors of those that failed.
    func openAll() -> [String] {
        var errors: [String] = []
        for pair in plan.pairs {
            let up = Self.carrier(pair.localInterface)
            lock.withLock { carrier[pair.localInterface] = up }
            errors += open(pair, count: plan.channelsPerPair)
        }
        return errors
    }

    /// Watches carrier and reopens channels on NICs that come back, every 100 ms.
    func start() {
        startThread("ferry-nics") { [self] in
            while !lock.withLock({ stopped }) {
                tick()
                usleep(100_000)
            }
        }
    }

    func stop() { lock.withLock { stopped = true } }

    private func tick() {
        let live = dataPath.liveChannelsByInterface
        for pair in plan.pairs {
            let nic = pair.localInterface
            let up = Self.carrier(nic)
            let was = lock.withLock { () -> Bool? in
                defer { carrier[nic] = up }
                return carrier[nic]
            }
            if was == true && !up {
                let n = dataPath.failChannels(onInterface: nic, reason: "\(nic) lost carrier")
                note("NIC \(nic) lost carrier: \(n) channel(s) failed over to the other NICs")
            }
            guard up, live[nic, default: 0] == 0 else { continue }
            // A NIC with carrier and no channel: (re)open, at most once a second.
            let go = lock.withLock { () -> Bool in
                if reconnecting.contains(nic) || stopped { return false }
                if let last = lastAttempt[nic], ContinuousClock.now - last < .seconds(1) { return false }
                reconnecting.insert(nic)
                lastAttempt[nic] = ContinuousClock.now
                return true
            }
            guard go else { continue }
            startThread("ferry-reopen") { [self] in
                let errors = open(pair, count: plan.channelsPerPair)
                let opened = plan.channelsPerPair - errors.count
                if opened > 0 { note("NIC \(nic) is back: \(opened) channel(s) opened") }
                lock.withLock { _ = reconnecting.remove(nic) }
            }
        }
    }

    private func open(_ pair: NICPair, count: Int) -> [String] {
        var errors: [String] = []
        for _ in 0..<count {
            let id = lock.withLock { () -> Int in
                defer { nextChannelID += 1 }
                return nextChannelID
            }
            do {
                let connection = try connect(id, pair)
                dataPath.addChannel(id, connection: connection, interface: pair.localInterface)
            } catch {
                errors.append("\(pair.localInterface) -> \(pair.remoteAddress): \(error)")
            }
        }
        return errors
    }

    /// A TCP connection over `pair`: bound to the local NIC's address (and to the device
    /// where we may), so that it leaves by that NIC whatever the routing table prefers.
    static func connect(over pair: NICPair, port: UInt16, timeout: Duration, logger: Logger) throws(SocketError) -> Socket {
        if isRealInterface(pair.localInterface) {
            do {
                return try Socket.connectTCP(host: pair.remoteAddress, port: port, timeout: timeout,
                                             device: pair.localInterface, source: pair.localAddress)
            } catch {
                // SO_BINDTODEVICE needs CAP_NET_RAW; the source address alone still picks
                // the NIC on a subnet of its own.
                logger.debug("binding to the device failed; binding the address only", metadata: ["error": "\(error)"])
            }
        }
        return try Socket.connectTCP(host: pair.remoteAddress, port: port, timeout: timeout, source: pair.localAddress)
    }

    private func connect(_ id: Int, _ pair: NICPair) throws -> FrameConnection {
        let socket = try Self.connect(over: pair, port: plan.port, timeout: plan.connectTimeout, logger: logger)
        socket.setUserTimeout(plan.deadChannelTimeout)
        if let unsent = plan.unsentLowWater { socket.setUnsentLowWater(unsent) }
        let connection = FrameConnection(socket: socket)
        let proof = ChannelBinding.proof(bindKey: plan.bindKey, session: plan.session, channel: UInt32(id))
        try connection.send(.bind, BindMessage(version: plan.version, session: plan.session, channel: UInt32(id),
                                               interface: pair.localInterface, proof: proof))
        socket.setReceiveTimeout(.seconds(10))
        let bound = try connection.expect(.bound, as: BoundMessage.self)
        socket.setReceiveTimeout(nil)
        guard bound.channel == UInt32(id) else { throw WireError.malformedMessage(.bound, "bound the wrong channel") }
        guard ChannelBinding.verify(proof: bound.proof, bindKey: plan.bindKey, session: plan.session, channel: UInt32(id), role: .bound) else {
            throw SecurityError.authenticationFailed("the destination's answer on channel \(id) does not prove the session key")
        }
        plan.security.secureData(connection, channel: UInt32(id), as: .source)
        return connection
    }

    static func isRealInterface(_ name: String) -> Bool {
        FileManager.default.fileExists(atPath: "/sys/class/net/\(name)")
    }

    static func carrier(_ name: String) -> Bool {
        isRealInterface(name) ? InterfaceDiscovery.hasCarrier(name) : true
    }
}

extension InterfaceMessage {
    init(_ nic: NetworkInterface) {
        self.init(name: nic.name, addresses: nic.addresses.map { "\($0.address)/\($0.prefixLength)" },
                  speedBitsPerSecond: nic.speedBitsPerSecond, mtu: nic.mtu, carrier: nic.carrier)
    }

    var networkInterface: NetworkInterface {
        NetworkInterface(
            name: name,
            addresses: addresses.compactMap { text in
                let parts = text.split(separator: "/")
                guard parts.count == 2, let prefix = Int(parts[1]) else { return nil }
                return InterfaceAddress(address: String(parts[0]), prefixLength: prefix)
            },
            speedBitsPerSecond: speedBitsPerSecond, mtu: mtu, carrier: carrier,
            isLoopback: addresses.contains { $0.hasPrefix("127.") || $0.hasPrefix("::1/") })
    }
}
