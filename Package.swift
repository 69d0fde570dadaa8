// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "ferry",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "ferry", targets: ["ferry"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // The few Linux calls Swift cannot make directly (CRC32C with SSE4.2, affinity, splice).
        .target(name: "CFerryLinux"),
        // Blocking POSIX sockets, child processes, /proc readings: the I/O edge.
        .target(name: "FerryIO", dependencies: ["CFerryLinux"]),
        // The host configuration file (/etc/ferry/ferry.conf): a small TOML reader, the keys
        // and the variables they stand for, precedence. Foundation only.
        .target(name: "FerryConfig"),
        // Protocol messages and the frame codec: pure values, no sockets.
        .target(name: "FerryWire", dependencies: [
            "CFerryLinux", "CFerryAEAD",
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        // QMP client: framing, greeting, commands, events, timeouts.
        .target(name: "FerryQMP", dependencies: [
            "FerryWire", "FerryIO",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The system's LZ4 and zstd libraries.
        .systemLibrary(name: "CFerryCompress", providers: [.apt(["liblz4-dev", "libzstd-dev"])]),
        // AES-256-GCM in place, for chunk payloads (OpenSSL's libcrypto).
        .systemLibrary(name: "CFerryAEAD", providers: [.apt(["libssl-dev"])]),
        // Chunk compression: codecs, reusable per-thread contexts, the automatic codec choice.
        .target(name: "FerryCompress", dependencies: ["CFerryCompress"]),
        // Data channels, striping, reordering, acknowledgements, failover.
        .target(name: "FerryTransport", dependencies: [
            "FerryWire", "FerryIO", "CFerryLinux", "FerryCompress",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // QEMU processes, VM specs, state directories, boot-file store.
        .target(name: "FerryVM", dependencies: [
            "CFerryLinux", "FerryWire", "FerryIO", "FerryQMP",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // NIC discovery (getifaddrs, /sys/class/net): speed, MTU, carrier, addresses; pairing.
        .target(name: "FerryInterfaces"),
        // libvirt's C library, loaded at run time (dlopen): domains, peer-to-peer migration, job statistics.
        .target(name: "FerryLibvirt"),
        // Orchestration: source and destination state machines, policy, report.
        .target(name: "FerryMigration", dependencies: [
            "FerryWire", "FerryQMP", "FerryTransport", "FerryVM", "FerryInterfaces", "FerryCompress", "FerryLibvirt",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Prometheus metrics: the daemon's registry and /metrics responder, and the reporter
        // through which every process on the host sends migration events to the daemon.
        .target(name: "FerryMetrics", dependencies: [
            "FerryIO",
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
        ]),
        // The test lab: network namespaces, veth NICs, tc rates.
        .target(name: "FerryLab", dependencies: ["FerryVM", "FerryIO", "FerryInterfaces", "FerryWire", "FerryLibvirt"]),
        // `ferry bench`: Ferry and its peers (QEMU alone, ECMP, MPTCP) side by side in the lab.
        .target(name: "FerryBench", dependencies: ["FerryLab", "FerryVM", "FerryQMP", "FerryIO", "FerryMigration", "FerryWire", "FerryInterfaces"]),
        .executableTarget(name: "ferry", dependencies: [
            "FerryBench", "FerryConfig",
            "FerryWire", "FerryIO", "FerryQMP", "FerryTransport", "FerryVM", "FerryMigration", "FerryLab", "FerryInterfaces", "FerryCompress", "FerryMetrics", "FerryLibvirt", "CFerryLinux",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The fuzz harness for the frame decoder, the message decoders, the handshake and the
        // readers of the state files (FerryVM's StateFileCoding): corpus replay and seeds in
        // the normal build, libFuzzer in scripts/fuzz.sh's build.
        .executableTarget(name: "ferry-fuzz", dependencies: ["FerryWire", "FerryVM"], path: "Sources/FerryFuzz"),
        .testTarget(name: "FerryWireTests", dependencies: ["FerryWire", .product(name: "Crypto", package: "swift-crypto")]),
        .testTarget(name: "FerryQMPTests", dependencies: ["FerryQMP", "FerryWire"]),
        .testTarget(name: "FerryCompressTests", dependencies: ["FerryCompress"]),
        .testTarget(name: "FerryTransportTests", dependencies: ["FerryTransport", "FerryWire", "FerryIO", "CFerryLinux", "FerryCompress", .product(name: "Crypto", package: "swift-crypto")]),
        .testTarget(name: "FerryVMTests", dependencies: ["FerryVM", "FerryWire", "FerryIO"]),
        .testTarget(name: "FerryInterfacesTests", dependencies: ["FerryInterfaces"]),
        .testTarget(name: "FerryMigrationTests", dependencies: ["FerryMigration", "FerryInterfaces", "FerryWire", "FerryIO", "FerryVM", "FerryQMP", .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "FerryMetricsTests", dependencies: ["FerryMetrics", "FerryIO"]),
        .testTarget(name: "FerryCLITests", dependencies: ["ferry", "FerryWire", "FerryConfig", .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "FerryConfigTests", dependencies: ["FerryConfig"]),
        // Root-only suites: lab (namespaces) and end-to-end (two QEMUs, the real binary).
        .testTarget(name: "FerryIntegrationTests", dependencies: ["FerryWire", "FerryIO", "FerryVM", "FerryLab", "FerryMigration", "FerryBench", "FerryTransport", "FerryQMP", "FerryMetrics", "FerryLibvirt"], path: "IntegrationTests"),
        .testTarget(name: "FerryLibvirtTests", dependencies: ["FerryLibvirt"]),
    ]
)
