// The protocol's one table and its copies: Protocol/openrpc.json and the Python client's
// generated module must state the same methods, traits, errors, loss defaults and version as the
// server's tables (scripts/make_openrpc.py writes both from `ember-server --protocol`). A method or
// an error kind added on one side only fails here.
import Engine
import Foundation
import RPC
import TestSupport
import XCTest

final class ProtocolTableTests: XCTestCase {
    let root = fixturesDirectory + "/../.."

    func spec() throws -> [String: Any] {
        try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: root + "/Protocol/openrpc.json"))) as! [String: Any]
    }

    func testSpecStatesEveryMethodWithTheServersTraits() throws {
        let doc = try spec()
        let methods = doc["methods"] as! [[String: Any]]
        XCTAssertEqual(methods.map { $0["name"] as! String }, RPCMethod.names, "the spec's methods, in table order")
        for m in methods {
            let method = try RPCMethod.named(m["name"] as! String)
            let x = try XCTUnwrap(m["x-ember"] as? [String: Any], method.name)
            let t = method.traits
            XCTAssertEqual(x["scheduling"] as? String, t.scheduling.rawValue, method.name)
            XCTAssertEqual(x["mutates"] as? Bool, t.mutates, method.name)
            XCTAssertEqual(x["retry_safe"] as? Bool, t.retrySafe, method.name)
            XCTAssertEqual(x["large_bodies"] as? Bool, t.largeBodies, method.name)
        }
        XCTAssertEqual((doc["info"] as! [String: Any])["version"] as? String, EmberVersion.string)
    }

    func testSpecErrorsAreTheErrorTable() throws {
        let errors = ((try spec())["components"] as! [String: Any])["errors"] as! [String: [String: Any]]
        struct Row: Hashable { let kind: String, code: Int, message: String, status: Int }
        let documented = Set(errors.values.map {
            Row(kind: ($0["data"] as! [String: Any])["kind"] as! String, code: $0["code"] as! Int,
                message: $0["message"] as! String, status: $0["x-ember-http-status"] as! Int)
        })
        let table = Set(ErrorKind.allCases.map { Row(kind: $0.rawValue, code: $0.code, message: $0.message, status: $0.httpStatus) })
        XCTAssertEqual(documented, table)
        XCTAssertEqual(errors.count, ErrorKind.allCases.count)
        // Domain codes stay in the JSON-RPC server-error range.
        for k in ErrorKind.allCases where k.code > -32100 { XCTAssertTrue((-32099)...(-32000) ~= k.code, k.rawValue) }
    }

    func testSpecLossDefaultsAreTheServers() throws {
        let schemas = ((try spec())["components"] as! [String: Any])["schemas"] as! [String: Any]
        let stated = (schemas["Loss"] as! [String: Any])["x-ember-defaults"] as! NSDictionary
        let ours = try JSONSerialization.jsonObject(with: JSONRPC.encode(LossDefaults.json)) as! NSDictionary
        XCTAssertEqual(stated, ours)
    }

    func testPythonClientModuleIsGeneratedFromTheSameTables() throws {
        let text = try String(contentsOfFile: root + "/clients/python/ember/protocol.py", encoding: .utf8)
        XCTAssertTrue(text.contains("VERSION = '\(EmberVersion.string)'"), "regenerate with scripts/make_openrpc.py")
        for m in RPCMethod.allCases {
            XCTAssertTrue(text.contains("\"\(m.name)\": {"), m.name)
        }
        for k in ErrorKind.allCases { XCTAssertTrue(text.contains("\"\(k.rawValue)\": \(k.code)"), k.rawValue) }
    }

    /// Every traits combination the scheduler acts on is consistent: what mutates runs exclusively,
    /// what is retry-safe mutates nothing.
    func testTraitsAreConsistent() {
        for m in RPCMethod.allCases {
            let t = m.traits
            if t.mutates { XCTAssertEqual(t.scheduling, .exclusive, m.name) }
            if t.retrySafe { XCTAssertFalse(t.mutates, m.name) }
        }
    }
}
