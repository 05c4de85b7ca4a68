// The crash-safe checkpoint store on its own: versions behind a link, a failed write publishing
// nothing, the remains of interrupted saves cleaned, names confined to the folder.
import Foundation
import TestSupport
import Weights
import XCTest

final class CheckpointStoreTests: XCTestCase {
    var dir = ""
    var store: CheckpointStore!

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "ember-store-\(UUID().uuidString)"
        store = try CheckpointStore.open(directory: dir)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func entries() throws -> [String] { try FileManager.default.contentsOfDirectory(atPath: dir).sorted() }

    func write(_ text: String) -> (String) throws -> Void {
        { folder in try Data(text.utf8).write(to: URL(fileURLWithPath: folder + "/data.txt")) }
    }

    func read(_ name: String) throws -> String {
        try String(contentsOfFile: try store.folder(name) + "/data.txt", encoding: .utf8)
    }

    func testVersionsReplaceEachOtherBehindOneLink() throws {
        XCTAssertEqual(try store.save("run", write: write("one")), 1)
        XCTAssertEqual(try read("run"), "one")
        XCTAssertEqual(try store.save("run", write: write("two")), 2)
        XCTAssertEqual(try read("run"), "two")
        XCTAssertEqual(try entries(), ["run", "run.v2"], "the old version and every temporary are gone")
        try store.save("other", write: write("x"))
        XCTAssertEqual(store.names(), ["other", "run"])
    }

    func testAFailedWritePublishesNothingAndKeepsThePreviousVersion() throws {
        try store.save("run", write: write("one"))
        struct DiskFull: Error {}
        XCTAssertThrowsError(try store.save("run") { folder in
            try Data("partial".utf8).write(to: URL(fileURLWithPath: folder + "/data.txt"))
            throw DiskFull()
        }) { e in
            guard case let .saveFailed(name, _, kept)? = e as? CheckpointStoreError else { return XCTFail("\(e)") }
            XCTAssertEqual(name, "run")
            XCTAssertTrue(kept)
        }
        XCTAssertEqual(try read("run"), "one")
        XCTAssertEqual(try entries(), ["run", "run.v1"])
        XCTAssertThrowsError(try store.save("fresh") { _ in throw DiskFull() }) { e in
            guard case let .saveFailed(_, _, kept)? = e as? CheckpointStoreError else { return XCTFail("\(e)") }
            XCTAssertFalse(kept, "nothing was saved under a new name")
        }
        XCTAssertEqual(store.names(), ["run"])
    }

    /// What a process killed mid-save leaves: a temporary folder, a temporary link, and a version
    /// folder renamed into place but never linked. `clean` removes exactly those; a later save of
    /// the same name still works.
    func testCleanRemovesTheRemainsOfAnInterruptedSave() throws {
        try store.save("run", write: write("one"))
        let fm = FileManager.default
        try fm.createDirectory(atPath: dir + "/.tmp-1234", withIntermediateDirectories: true)
        try fm.createSymbolicLink(atPath: dir + "/.tmp-link-5678", withDestinationPath: "run.v2")
        try fm.createDirectory(atPath: dir + "/run.v2", withIntermediateDirectories: true)
        try fm.createDirectory(atPath: dir + "/notes", withIntermediateDirectories: true)
        XCTAssertEqual(Set(store.clean()), [".tmp-1234", ".tmp-link-5678", "run.v2"])
        XCTAssertEqual(try entries(), ["notes", "run", "run.v1"], "a folder that is not the store's stays")
        XCTAssertEqual(try store.save("run", write: write("two")), 2)
        XCTAssertEqual(try read("run"), "two")
    }

    func testNamesCannotLeaveTheFolderOrLookLikeVersions() throws {
        for bad in ["../escape", "/etc/passwd", "a/b", "..", ".hidden", "x.v3", "", String(repeating: "a", count: 129), "a\u{0}b"] {
            XCTAssertThrowsError(try store.save(bad, write: write("x")), bad) { XCTAssertEqual($0 as? CheckpointStoreError, .invalidName(bad)) }
            XCTAssertThrowsError(try store.folder(bad), bad)
        }
        XCTAssertThrowsError(try store.folder("missing")) { XCTAssertEqual($0 as? CheckpointStoreError, .notFound("missing")) }
        XCTAssertEqual(try entries(), [])
    }
}
