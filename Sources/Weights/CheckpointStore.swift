// Named checkpoints in one folder, crash-safe. A name is a symbolic link `name` -> `name.v<N>`,
// a folder the caller fills. Saving writes the next version into a temporary folder, fsyncs its
// files and itself, renames it to `name.v<N+1>`, and swaps the link with one rename(2); only then
// is the previous version removed. A crash at any point leaves the name linked to a complete
// version. `clean()` (at start-up) removes what an interrupted save leaves: `.tmp-*` entries and
// version folders no name links to.
import Foundation

public enum CheckpointStoreError: Error, CustomStringConvertible, Equatable {
    /// The name breaks the naming rule (`CheckpointStore.nameRule`).
    case invalidName(String)
    case notFound(String)
    /// Nothing was published; `previousKept` says whether the name still links to an older version.
    case saveFailed(name: String, reason: String, previousKept: Bool)

    public var description: String {
        switch self {
        case let .invalidName(n): "checkpoint name '\(n)': \(CheckpointStore.nameRule)"
        case let .notFound(n): "no checkpoint named '\(n)'"
        case let .saveFailed(n, r, kept):
            "\(r); " + (kept ? "the previous checkpoint '\(n)' is unchanged" : "nothing was saved")
        }
    }
}

public struct CheckpointStore: Sendable {
    public let directory: String
    public static let nameRule = "letters, digits, '.', '_' and '-' only (no leading dot, no '..', no '.v'), at most 128 characters"

    public init(directory: String) { self.directory = directory }

    /// Creates the folder if needed.
    public static func open(directory: String) throws -> CheckpointStore {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        return CheckpointStore(directory: directory)
    }

    /// Checks a name against `nameRule`: it can neither leave the folder nor look like a version folder.
    public static func validate(name: String) throws {
        let allowed = name.unicodeScalars.allSatisfy { CharacterSet.alphanumerics.contains($0) || "._-".unicodeScalars.contains($0) }
        guard allowed, !name.isEmpty, name.count <= 128, !name.hasPrefix("."), !name.contains(".."), !name.contains(".v") else {
            throw CheckpointStoreError.invalidName(name)
        }
    }

    private func path(_ item: String) -> String { directory + "/" + item }

    private func linkTarget(_ name: String) -> String? { try? FileManager.default.destinationOfSymbolicLink(atPath: path(name)) }

    /// The folder `name` currently links to.
    public func folder(_ name: String) throws -> String {
        try Self.validate(name: name)
        guard let target = linkTarget(name) else { throw CheckpointStoreError.notFound(name) }
        return path(target)
    }

    /// Saved names, sorted.
    public func names() -> [String] {
        let items = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return items.filter { !$0.hasPrefix(".") && linkTarget($0) != nil }.sorted()
    }

    /// Publishes a new version of `name`: `write` fills a fresh folder (given as its path).
    /// Returns the version number. On any failure nothing is published and the name keeps
    /// linking to its previous version.
    @discardableResult
    public func save(_ name: String, write: (String) throws -> Void) throws -> Int {
        try Self.validate(name: name)
        let fm = FileManager.default
        let previous = linkTarget(name)
        var version = 1
        if let prev = previous, let v = Int(prev.split(separator: "v").last ?? "") { version = v + 1 }
        let target = "\(name).v\(version)"
        // A version folder a crash left unpublished is not a checkpoint: replace it.
        try? fm.removeItem(atPath: path(target))
        let tmp = path(".tmp-\(UUID().uuidString)")
        do {
            try fm.createDirectory(atPath: tmp, withIntermediateDirectories: true)
            try write(tmp)
            try Self.sync(folder: tmp)
            try fm.moveItem(atPath: tmp, toPath: path(target))
            let tmpLink = path(".tmp-link-\(UUID().uuidString)")
            try fm.createSymbolicLink(atPath: tmpLink, withDestinationPath: target)
            guard rename(tmpLink, path(name)) == 0 else {
                let reason = String(cString: strerror(errno))
                try? fm.removeItem(atPath: tmpLink)
                try? fm.removeItem(atPath: path(target))
                throw WeightsError.writeFailed(path: path(name), reason: reason)
            }
            try? Self.sync(folder: directory)
        } catch {
            try? fm.removeItem(atPath: tmp)
            throw CheckpointStoreError.saveFailed(name: name, reason: "\(error)", previousKept: previous != nil)
        }
        if let prev = previous { try? fm.removeItem(atPath: path(prev)) }
        return version
    }

    /// Removes what an interrupted save leaves behind. Returns the entries removed.
    @discardableResult
    public func clean() -> [String] {
        let fm = FileManager.default
        let items = (try? fm.contentsOfDirectory(atPath: directory)) ?? []
        // Only names count: a temporary link left by a crash protects nothing.
        let linked = Set(items.filter { !$0.hasPrefix(".tmp-") }.compactMap { linkTarget($0) })
        var removed: [String] = []
        for item in items {
            let isLink = linkTarget(item) != nil
            let strayVersion = !isLink && item.range(of: #"\.v[0-9]+$"#, options: .regularExpression) != nil && !linked.contains(item)
            if item.hasPrefix(".tmp-") || strayVersion {
                if (try? fm.removeItem(atPath: path(item))) != nil { removed.append(item) }
            }
        }
        return removed
    }

    /// fsyncs a folder's files and the folder itself, so a published version survives a power cut.
    static func sync(folder: String) throws {
        for item in (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? [] {
            let fd = Foundation.open(folder + "/" + item, O_RDONLY)
            if fd >= 0 {
                defer { close(fd) }
                guard fsync(fd) == 0 else { throw WeightsError.writeFailed(path: folder + "/" + item, reason: String(cString: strerror(errno))) }
            }
        }
        let fd = Foundation.open(folder, O_RDONLY | O_DIRECTORY)
        if fd >= 0 { _ = fsync(fd); close(fd) }
    }
}
