import Foundation
import Logging

/// Log lines for journald, when stderr is the journal (systemd's `JOURNAL_STREAM` names
/// stderr's device and inode): each line starts with its syslog priority as sd-daemon(3)
/// writes it, `<4>`, which journald turns into the entry's level (`journalctl -p warning`)
/// and strips; no timestamp, since journald stamps every entry. Anywhere else (a terminal,
/// a file, a test) the logs keep swift-log's stream format.
struct JournalLogHandler: LogHandler {
    let label: String
    var logLevel: Logger.Level
    var metadata: Logger.Metadata = [:]

    init(label: String, logLevel: Logger.Level) {
        self.label = label
        self.logLevel = logLevel
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    /// `JOURNAL_STREAM` is "DEVICE:INODE" of the stream systemd connected; it is inherited
    /// by children whose stderr may be something else, hence the comparison (systemd.exec(5)).
    static var standardErrorIsJournal: Bool {
        isJournal(environment: ProcessInfo.processInfo.environment["JOURNAL_STREAM"], descriptor: STDERR_FILENO)
    }

    static func isJournal(environment value: String?, descriptor: Int32) -> Bool {
        guard let value else { return false }
        let parts = value.split(separator: ":")
        guard parts.count == 2, let device = UInt64(parts[0]), let inode = UInt64(parts[1]) else { return false }
        var info = stat()
        guard fstat(descriptor, &info) == 0 else { return false }
        return UInt64(info.st_dev) == device && UInt64(info.st_ino) == inode
    }

    /// syslog(3) priorities: swift-log has no alert or emergency, and trace is debug.
    static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: 7
        case .info: 6
        case .notice: 5
        case .warning: 4
        case .error: 3
        case .critical: 2
        }
    }

    /// The lines for one message: every line prefixed with the priority (journald reads
    /// each line as an entry), the label, the metadata sorted as key=value at the end.
    static func format(level: Logger.Level, label: String, message: String, metadata: Logger.Metadata) -> String {
        let details = metadata.isEmpty ? "" : " " + metadata.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        let prefix = "<\(priority(level))>"
        let lines = (message + details).split(separator: "\n", omittingEmptySubsequences: false)
        return lines.enumerated().map { i, line in prefix + (i == 0 ? "\(label): " : "  ") + line }.joined(separator: "\n") + "\n"
    }

    func log(event: LogEvent) {
        var merged = event.metadata.map { metadata.merging($0) { $1 } } ?? metadata
        if let error = event.error { merged["error"] = "\(error)" }
        let text = Self.format(level: event.level, label: label, message: event.message.description, metadata: merged)
        FileHandle.standardError.write(Data(text.utf8))
    }
}
