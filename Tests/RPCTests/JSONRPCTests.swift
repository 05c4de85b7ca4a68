// JSON-RPC 2.0 envelopes without sockets: single calls, batches, notifications, id echo, the
// standard error codes, and hostile bodies (deep nesting, huge numbers, invalid UTF-8).
import Foundation
import Models
import RPC
import TestSupport
import XCTest

final class JSONRPCTests: XCTestCase {
    func decode(_ s: String) -> RPCEnvelope { JSONRPC.decode(Data(s.utf8)) }

    func single(_ s: String) -> (Result<RPCRequest, RPCError>, RequestID?)? {
        if case let .single(r, id) = decode(s) { return (r, id) }
        return nil
    }

    func testCallsAndIds() throws {
        let (r, id) = single(#"{"jsonrpc":"2.0","method":"server.info","id":7}"#)!
        XCTAssertEqual(try r.get().method, "server.info")
        XCTAssertEqual(id, .number("7"))
        XCTAssertEqual(single(#"{"jsonrpc":"2.0","method":"m","id":"abc"}"#)!.1, .string("abc"))
        XCTAssertEqual(single(#"{"jsonrpc":"2.0","method":"m","id":null}"#)!.1, .null)
        XCTAssertEqual(single(#"{"jsonrpc":"2.0","method":"m","id":2.5}"#)!.1, .number("2.5"))
        let note = try single(#"{"jsonrpc":"2.0","method":"m","params":{"a":1}}"#)!.0.get()
        XCTAssertTrue(note.isNotification)
        XCTAssertEqual((note.params as? [String: Any])?["a"] as? Int, 1)
        // The id is echoed exactly.
        let out = String(decoding: JSONRPC.encode(JSONRPC.response(id: .number("12345678901234567"), result: ["ok": true])), as: UTF8.self)
        XCTAssertEqual(out, #"{"id":12345678901234567,"jsonrpc":"2.0","result":{"ok":true}}"#)
        let s = String(decoding: JSONRPC.encode(JSONRPC.response(id: .string("x\"y"), result: NSNull())), as: UTF8.self)
        XCTAssertEqual(s, #"{"id":"x\"y","jsonrpc":"2.0","result":null}"#)
    }

    func testStandardErrors() {
        guard case let .failure(e) = decode("{not json") else { return XCTFail() }
        XCTAssertEqual(e.code, -32700)
        for body in [#"{"method":"m","id":1}"#, #"{"jsonrpc":"1.0","method":"m","id":1}"#, #"{"jsonrpc":"2.0","id":1}"#,
                     #"{"jsonrpc":"2.0","method":5,"id":1}"#, #"{"jsonrpc":"2.0","method":"m","params":3,"id":1}"#,
                     #"{"jsonrpc":"2.0","method":"m","id":true}"#, #"{"jsonrpc":"2.0","method":"m","id":[1]}"#, "42", #""text""#] {
            guard let (r, _) = single(body), case let .failure(err) = r else { XCTFail(body); continue }
            XCTAssertEqual(err.code, -32600, body)
        }
        // An invalid request still echoes a readable id.
        XCTAssertEqual(single(#"{"jsonrpc":"1.0","method":"m","id":9}"#)!.1, .number("9"))
        let err = JSONRPC.encode(JSONRPC.response(id: nil, error: .invalidParams(path: "params.n", "must be at least 1")))
        let obj = try! JSONSerialization.jsonObject(with: err) as! [String: Any]
        let body = obj["error"] as! [String: Any]
        XCTAssertEqual(body["code"] as? Int, -32602)
        XCTAssertEqual((body["data"] as! [String: Any])["path"] as? String, "params.n")
        XCTAssertEqual((body["data"] as! [String: Any])["kind"] as? String, "invalid_params")
        XCTAssertTrue(obj["id"] is NSNull)
    }

    func testBatches() throws {
        guard case let .batch(items) = decode(#"[{"jsonrpc":"2.0","method":"a","id":1},{"jsonrpc":"2.0","method":"b"},5,{"foo":"boo"}]"#) else {
            return XCTFail()
        }
        XCTAssertEqual(items.count, 4)
        XCTAssertEqual(try items[0].0.get().method, "a")
        XCTAssertTrue(try items[1].0.get().isNotification)
        if case .success = items[2].0 { XCTFail("5 is not a call") }
        if case .success = items[3].0 { XCTFail("no jsonrpc/method") }
        guard case let .failure(empty) = decode("[]") else { return XCTFail() }
        XCTAssertEqual(empty.code, -32600)
        let big = "[" + Array(repeating: #"{"jsonrpc":"2.0","method":"a"}"#, count: JSONRPC.maxBatch + 1).joined(separator: ",") + "]"
        guard case let .failure(tooMany) = decode(big) else { return XCTFail() }
        XCTAssertEqual(tooMany.code, -32600)
    }

    func testHostileBodiesGiveErrorsNotCrashes() {
        let deep = String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)
        guard case let .failure(e) = decode(deep) else { return XCTFail() }
        XCTAssertEqual(e.code, -32700)
        let deepObject = String(repeating: #"{"a":"#, count: 5000) + "1" + String(repeating: "}", count: 5000)
        guard case .failure = decode(deepObject) else { return XCTFail() }
        // Brackets inside strings do not count as nesting.
        let (ok, _) = single(#"{"jsonrpc":"2.0","method":"m","params":{"s":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["},"id":1}"#)!
        XCTAssertNoThrow(try ok.get())
        guard case .failure = JSONRPC.decode(Data([0x7B, 0xFF, 0xFE, 0x7D])) else { return XCTFail("invalid UTF-8") }
        let huge = #"{"jsonrpc":"2.0","method":"m","id":1e400}"#
        if case let .single(r, _) = decode(huge), case .success = r { XCTFail("1e400 is not a valid id") }
        _ = decode(#"{"jsonrpc":"2.0","method":"m","params":{"n":123456789012345678901234567890},"id":1}"#)
    }
}

/// Protocol/openrpc.json documents exactly the methods the server serves, each with its params
/// named as the dispatcher reads them.
final class OpenRPCDocumentTests: XCTestCase {
    func testDocumentedMethodsAreTheServedOnes() throws {
        let path = fixturesDirectory + "/../../Protocol/openrpc.json"
        let doc = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as! [String: Any]
        XCTAssertEqual(doc["openrpc"] as? String, "1.3.2")
        let methods = doc["methods"] as! [[String: Any]]
        XCTAssertEqual(Set(methods.map { $0["name"] as! String }), Set(RPCMethod.names))
        // Every documented parameter is accepted (no unknown-parameter error names it).
        let model = try TransformerModel.load(directory: fixtureModel("qwen2_tied"))
        let d = Dispatcher(model: model, tokenizer: nil)
        for m in methods {
            let name = m["name"] as! String
            for param in m["params"] as! [[String: Any]] {
                let key = param["name"] as! String
                do { _ = try d.call(name, [key: NSNull()]) } catch let e as RPCError {
                    XCTAssertFalse(e.hint?.contains("unknown parameter") == true && e.path == "params.\(key)", "\(name).\(key): \(e)")
                }
            }
        }
    }
}
