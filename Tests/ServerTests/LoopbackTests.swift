// The libuv server on loopback with a raw-socket client: keep-alive, pipelined JSON-RPC calls
// answered in order, notifications, 404/405, a malformed request answered 400 then closed.
import Foundation
import Models
import RPC
import Server
import TestSupport
import XCTest

final class LoopbackTests: XCTestCase {
    var running: TestServer!
    var server: HTTPServer { running.server }

    override func setUpWithError() throws {
        running = try TestServer(model: "qwen2_tied", slots: 4, capacity: 64)
    }

    override func tearDown() {
        XCTAssertTrue(running.stop(), "server loop should end after stop()")
    }

    func exchange(_ request: String, responses count: Int) throws -> [(status: Int, body: String)] {
        try LoopbackClient(port: server.port).exchange(request, responses: count)
    }

    func post(_ json: String, close: Bool = false) -> String {
        "POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: \(json.utf8.count)\r\n" +
            (close ? "Connection: close\r\n" : "") + "\r\n" + json
    }

    func testPipelinedCallsAnsweredInOrder() throws {
        let calls = (1...5).map { i in post(#"{"jsonrpc":"2.0","method":"server.info","id":\#(i)}"#) }.joined()
            + post(#"{"jsonrpc":"2.0","method":"logprob","params":{"sequences":[{"tokens":[1,2,3],"response_start":1}]},"id":"s"}"#)
            + "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        let rs = try exchange(calls, responses: 7)
        XCTAssertEqual(rs.count, 7)
        for i in 0..<5 {
            XCTAssertEqual(rs[i].status, 200)
            XCTAssertTrue(rs[i].body.contains("\"id\":\(i + 1)"), rs[i].body)
        }
        XCTAssertTrue(rs[5].body.contains("\"logprobs\""), rs[5].body)
        XCTAssertTrue(rs[5].body.contains("\"id\":\"s\""))
        XCTAssertEqual(rs[6].status, 200)
        let metrics = try exchange("GET /metrics HTTP/1.1\r\n\r\n", responses: 1)[0]
        XCTAssertEqual(metrics.status, 200)
        XCTAssertTrue(metrics.body.contains("ember_rpc_requests_total{method=\"server.info\"} 5"), metrics.body)
        XCTAssertTrue(metrics.body.contains("ember_tokens_scored_total 2"), metrics.body)
        XCTAssertTrue(metrics.body.contains("ember_weights_version 0"))
        XCTAssertTrue(metrics.body.contains("# TYPE ember_kv_cache_bytes gauge"))
    }

    func testNotificationsErrorsAndStatuses() throws {
        let rs = try exchange(post(#"{"jsonrpc":"2.0","method":"server.info"}"#)
                              + post(#"[{"jsonrpc":"2.0","method":"server.info","id":1},{"jsonrpc":"2.0","method":"nope","id":2},{"jsonrpc":"2.0","method":"server.info"}]"#)
                              + post("{oops")
                              + "GET /nowhere HTTP/1.1\r\n\r\n" + "GET /rpc HTTP/1.1\r\n\r\n", responses: 5)
        XCTAssertEqual(rs.map(\.status), [204, 200, 200, 404, 405])
        XCTAssertTrue(rs[1].body.contains("-32601"), rs[1].body)
        XCTAssertTrue(rs[2].body.contains("-32700"), rs[2].body)
        let bad = try exchange("BROKEN\r\n\r\n", responses: 1)
        XCTAssertEqual(bad.first?.status, 400)
        let smuggle = try exchange("POST /rpc HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", responses: 1)
        XCTAssertEqual(smuggle.first?.status, 400)
    }
}

final class AuthTests: XCTestCase {
    func testAPIKeyGuardsEveryRouteButHealthz() throws {
        let running = try TestServer(model: "gpt2", apiKey: "s3cret")
        defer { running.stop() }
        let client = LoopbackClient(port: running.server.port)
        let body = #"{"jsonrpc":"2.0","method":"server.info","id":1}"#
        func req(_ auth: String?) -> String {
            "POST /rpc HTTP/1.1\r\nContent-Length: \(body.utf8.count)\r\n" + (auth.map { "Authorization: \($0)\r\n" } ?? "") + "\r\n" + body
        }
        let rs = try client.exchange(req(nil) + req("Bearer wrong") + req("Bearer s3cret") + "GET /healthz HTTP/1.1\r\n\r\n", responses: 4)
        XCTAssertEqual(rs.map { $0.status }, [401, 401, 200, 200])
        XCTAssertTrue(rs[0].body.contains("unauthorized"))
    }
}

final class TimeoutTests: XCTestCase {
    /// A client that stops mid-headers is answered 408 and closed after the request timeout,
    /// while another client is served meanwhile; connections beyond the limit get 503.
    func testStalledClientTimedOutOthersServed() throws {
        let running = try TestServer(model: "gpt2", requestTimeoutMs: 300, idleTimeoutMs: 2_000, maxConnections: 2)
        let server = running.server
        defer { running.stop() }
        let started = Date()
        let stalled = LoopbackClient(port: server.port)
        let group = DispatchGroup()
        nonisolated(unsafe) var stalledResult: [(status: Int, body: String)] = []
        group.enter()
        DispatchQueue.global().async {
            stalledResult = (try? stalled.exchange("POST /rpc HTTP/1.1\r\nContent-Le", responses: 1)) ?? []
            group.leave()
        }
        usleep(50_000)
        let ok = try LoopbackClient(port: server.port).exchange("GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n", responses: 1)
        XCTAssertEqual(ok.first?.status, 200, "served while another client stalls")
        group.wait()
        XCTAssertEqual(stalledResult.first?.status, 408)
        XCTAssertLessThan(Date().timeIntervalSince(started), 5)
    }

    func testConnectionsBeyondTheLimitGet503() throws {
        let running = try TestServer(model: "gpt2", requestTimeoutMs: 2_000, idleTimeoutMs: 2_000, maxConnections: 1)
        let server = running.server
        defer { running.stop() }
        // Hold one connection open without sending anything.
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(server.port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        usleep(100_000)
        let second = try LoopbackClient(port: server.port).exchange("GET /healthz HTTP/1.1\r\n\r\n", responses: 1)
        XCTAssertEqual(second.first?.status, 503)
    }
}

