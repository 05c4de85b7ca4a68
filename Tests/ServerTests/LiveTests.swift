// Live loopback tests of the whole server: many clients mixing generate, logprob and train_step;
// a client that disconnects mid-generation; Unix socket and IPv6 listeners; the OpenAI routes
// (plain and streamed); graceful shutdown answering in-flight calls.
import Foundation
import RPC
import Server
import TestSupport
import XCTest

final class LiveTests: XCTestCase {
    /// 6 clients x 8 calls each, over keep-alive connections at once. Every call is answered
    /// exactly once with its own id; train_step versions are 1...N without repeats; every
    /// generate result reports the version its samples were drawn under.
    func testManyClientsMixingGenerateLogprobAndTrainStep() throws {
        let server = try TestServer(model: "qwen2_tied", slots: 8, capacity: 64)
        defer { server.stop() }
        let clients = 6, rounds = 8
        let store = LockedReplies(count: clients)
        DispatchQueue.concurrentPerform(iterations: clients) { c in
            var requests = ""
            for r in 0..<rounds {
                let id = "c\(c)-r\(r)"
                switch (c + r) % 4 {
                case 0:
                    requests += httpPost(rpcBody("generate", ["prompt_tokens": [[1, 2, c + 3]], "max_tokens": 6, "n": 2, "seed": c], id: id))
                case 1:
                    requests += httpPost(rpcBody("logprob", ["sequences": [["tokens": [1, 2, 3, c + 4], "response_start": 1]]], id: id))
                case 2:
                    requests += httpPost(rpcBody("train_step", ["batch": [["tokens": [1, 2, 3, 4, c + 5], "response_start": 2, "advantage": 0.5]],
                                                            "loss": ["mode": "ppo"], "optimizer": ["lr": 0.001]], id: id))
                default:
                    requests += httpPost(rpcBody("server.info", id: id))
                }
            }
            store.set(c, (try? LoopbackClient(port: server.server.port).replies(requests, count: rounds)) ?? [])
        }
        let replies = store.all
        var trainVersions: [Int] = []
        for c in 0..<clients {
            XCTAssertEqual(replies[c].count, rounds, "client \(c) lost a response")
            for (r, reply) in replies[c].enumerated() {
                XCTAssertEqual(reply.status, 200)
                let obj = reply.json
                XCTAssertEqual(obj["id"] as? String, "c\(c)-r\(r)", "answers arrive in request order with their own id")
                XCTAssertNil(obj["error"], reply.body)
                let result = obj["result"] as? [String: Any]
                if (c + r) % 4 == 2 { trainVersions.append(result?["weights_version"] as? Int ?? -1) }
                if (c + r) % 4 == 0 {
                    let samples = ((result?["results"] as? [[String: Any]])?[0]["samples"] as? [[String: Any]]) ?? []
                    XCTAssertEqual(samples.count, 2)
                }
            }
        }
        XCTAssertEqual(trainVersions.sorted(), Array(1...trainVersions.count), "each train step bumps the version exactly once")
        XCTAssertEqual(server.scheduler.gauges.weightsVersion, trainVersions.count)
    }

    /// A client that closes its connection mid-generation has the generation cancelled.
    func testDisconnectCancelsGeneration() throws {
        let server = try TestServer(model: "qwen2_tied", slots: 4, capacity: 65536)
        defer { server.stop() }
        let client = LoopbackClient(port: server.server.port)
        let fd = try client.connectSocket()
        LoopbackClient.send(fd, httpPost(rpcBody("generate", ["prompt_tokens": [[1, 2]], "max_tokens": 60000, "n": 4, "ignore_eos": true])))
        let deadline = Date().addingTimeInterval(10)
        while server.scheduler.gauges.running < 4 && Date() < deadline { usleep(500) }
        XCTAssertEqual(server.scheduler.gauges.running, 4)
        close(fd)
        let settle = Date().addingTimeInterval(10)
        while server.scheduler.gauges.running > 0 && Date() < settle { usleep(500) }
        let g = server.scheduler.gauges
        XCTAssertEqual(g.running, 0)
        XCTAssertEqual(g.kvBytesInUse, 0)
        XCTAssertLessThan(g.generatorSteps, 60000, "the generation stopped early")
        XCTAssertEqual(g.tokensGenerated, 0, "nothing was delivered")
    }

    func testUnixSocketAndIPv6() throws {
        let path = NSTemporaryDirectory() + "ember-test-\(getpid()).sock"
        var endpoints: [Endpoint] = [.tcp(host: "127.0.0.1", port: 0), .unix(path: path)]
        let v6 = socket(AF_INET6, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in6()
        addr.sin6_family = sa_family_t(AF_INET6)
        addr.sin6_addr = in6addr_loopback
        let hasIPv6 = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(v6, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) } } == 0
        close(v6)
        if hasIPv6 { endpoints.append(.tcp(host: "::1", port: 0)) }
        let server = try TestServer(model: "gpt2", endpoints: endpoints)
        var st = stat()
        XCTAssertEqual(lstat(path, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o600, "the socket is private to its owner")
        let viaUnix = try LoopbackClient(.unix(path)).replies(httpPost(rpcBody("server.info")), count: 1)
        XCTAssertEqual((viaUnix.first?.json["result"] as? [String: Any])?["name"] as? String, "ember")
        if hasIPv6 {
            let viaV6 = try LoopbackClient(.ipv6(server.server.ports[1])).replies("GET /healthz HTTP/1.1\r\n\r\n", count: 1)
            XCTAssertEqual(viaV6.first?.status, 200)
        } else {
            print("note: no IPv6 loopback on this machine; the ::1 listener was not exercised")
        }
        XCTAssertTrue(server.stop())
        XCTAssertNotEqual(lstat(path, &st), 0, "the socket file is removed on stop")
    }

    /// SIGTERM path: stop() lets the answer to an in-flight call go out before the loop ends.
    func testGracefulStopAnswersInFlightCalls() throws {
        let server = try TestServer(model: "qwen2_tied", slots: 2, capacity: 65536)
        let fd = try LoopbackClient(port: server.server.port).connectSocket()
        defer { close(fd) }
        LoopbackClient.send(fd, httpPost(rpcBody("generate", ["prompt_tokens": [[1, 2]], "max_tokens": 60000, "ignore_eos": true], id: 42)))
        let deadline = Date().addingTimeInterval(10)
        while server.scheduler.gauges.running < 1 && Date() < deadline { usleep(500) }
        XCTAssertTrue(server.stop(), "the loop ends")
        let reply = LoopbackClient.read(fd, count: 1)
        XCTAssertEqual(reply.first?.status, 200)
        let error = reply.first?.json["error"] as? [String: Any]
        XCTAssertEqual((error?["data"] as? [String: Any])?["kind"] as? String, "shutting_down")
        XCTAssertEqual(reply.first?.json["id"] as? Int, 42)
    }
}

/// Replies gathered from several threads.
final class LockedReplies: @unchecked Sendable {
    private let lock = NSLock()
    private var replies: [[HTTPReply]]
    init(count: Int) { replies = Array(repeating: [], count: count) }
    func set(_ i: Int, _ r: [HTTPReply]) { lock.lock(); replies[i] = r; lock.unlock() }
    var all: [[HTTPReply]] { lock.lock(); defer { lock.unlock() }; return replies }
}

final class OpenAITests: XCTestCase {
    var server: TestServer!

    override func setUpWithError() throws {
        server = try TestServer(model: "qwen2_tied", modelDirectory: try modelForTokenizer("qwen2"), tokenizer: "qwen2", slots: 8, capacity: 128)
    }

    override func tearDown() { server?.stop() }

    func call(_ path: String, _ body: [String: Any]) throws -> HTTPReply {
        let json = String(decoding: try JSONSerialization.data(withJSONObject: body), as: UTF8.self)
        return try XCTUnwrap(LoopbackClient(port: server.server.port).replies(httpPost(json, path: path), count: 1).first)
    }

    func testModelsAndCompletions() throws {
        let models = try XCTUnwrap(LoopbackClient(port: server.server.port).replies("GET /v1/models HTTP/1.1\r\n\r\n", count: 1).first)
        XCTAssertEqual(((models.json["data"] as? [[String: Any]])?[0])?["id"] as? String, "test-model")

        let reply = try call("/v1/completions", ["model": "test-model", "prompt": ["def f(x):", "import os"], "max_tokens": 5,
                                                  "n": 2, "temperature": 0.8, "seed": 3, "logprobs": 2])
        XCTAssertEqual(reply.status, 200, reply.body)
        let choices = try XCTUnwrap(reply.json["choices"] as? [[String: Any]])
        XCTAssertEqual(choices.map { $0["index"] as? Int }, [0, 1, 2, 3])
        for c in choices {
            let lp = try XCTUnwrap(c["logprobs"] as? [String: Any])
            XCTAssertEqual((lp["token_logprobs"] as? [Double])?.count, 5)
            XCTAssertEqual((lp["top_logprobs"] as? [[String: Double]])?.first?.count ?? 0, 2, "\(lp)")
            XCTAssertEqual(c["finish_reason"] as? String, "length")
        }
        let usage = try XCTUnwrap(reply.json["usage"] as? [String: Int])
        XCTAssertEqual(usage["completion_tokens"], 20)

        // The same call through JSON-RPC gives the same samples (same seed, same weights).
        let tokensRPC = try LoopbackClient(port: server.server.port).replies(httpPost(rpcBody("generate", ["prompts": ["def f(x):", "import os"],
            "max_tokens": 5, "n": 2, "temperature": 0.8, "seed": 3])), count: 1)[0].json
        let rpcTexts = ((tokensRPC["result"] as? [String: Any])?["results"] as? [[String: Any]])?.flatMap { ($0["samples"] as? [[String: Any]])?.map { $0["text"] as? String ?? "" } ?? [] }
        XCTAssertEqual(rpcTexts, choices.map { $0["text"] as? String ?? "" })
    }

    /// Streamed text (server-sent events over chunked encoding) concatenates to the plain answer.
    func testStreamingMatchesPlainAnswer() throws {
        let body: [String: Any] = ["prompt": "class A:", "max_tokens": 12, "seed": 5, "temperature": 1.0, "n": 2, "stop": ["\n\n"]]
        let plain = try call("/v1/completions", body)
        var streamed = body
        streamed["stream"] = true
        streamed["stream_options"] = ["include_usage": true]
        let reply = try call("/v1/completions", streamed)
        XCTAssertEqual(reply.status, 200)
        XCTAssertEqual(reply.headers["content-type"], "text/event-stream")
        let events = reply.body.components(separatedBy: "\n\n").filter { !$0.isEmpty }
        XCTAssertEqual(events.last, "data: [DONE]")
        var texts = ["", ""], finishes: [String?] = [nil, nil]
        var usage: [String: Any]?
        for e in events.dropLast() {
            XCTAssertTrue(e.hasPrefix("data: "))
            let obj = try JSONSerialization.jsonObject(with: Data(e.dropFirst(6).utf8)) as! [String: Any]
            if let u = obj["usage"] as? [String: Any] { usage = u }
            for c in obj["choices"] as! [[String: Any]] {
                let i = c["index"] as! Int
                texts[i] += c["text"] as! String
                if let f = c["finish_reason"] as? String { finishes[i] = f }
            }
        }
        let plainChoices = plain.json["choices"] as! [[String: Any]]
        XCTAssertEqual(texts, plainChoices.map { $0["text"] as! String })
        XCTAssertEqual(finishes, plainChoices.map { $0["finish_reason"] as? String })
        XCTAssertNotNil(usage)
    }

    /// Echo with max_tokens 0 scores the prompt (how evaluation harnesses ask for log-likelihoods):
    /// the log-probs equal the logprob method's.
    func testEchoScoresPrompt() throws {
        let reply = try call("/v1/completions", ["prompt": "for i in range(10):", "max_tokens": 0, "echo": true, "logprobs": 0])
        XCTAssertEqual(reply.status, 200, reply.body)
        let choice = try XCTUnwrap((reply.json["choices"] as? [[String: Any]])?.first)
        XCTAssertEqual(choice["text"] as? String, "for i in range(10):")
        let lp = try XCTUnwrap(choice["logprobs"] as? [String: Any])
        let values = try XCTUnwrap(lp["token_logprobs"] as? [Any])
        XCTAssertTrue(values[0] is NSNull)
        let tokens = try XCTUnwrap(LoopbackClient(port: server.server.port).replies(httpPost(rpcBody("tokenize", ["text": "for i in range(10):"])), count: 1)[0]
            .json["result"] as? [String: Any])["tokens"] as! [Int]
        let scored = try LoopbackClient(port: server.server.port).replies(httpPost(rpcBody("logprob", ["sequences": [["tokens": tokens, "response_start": 1]]])), count: 1)[0]
        let want = ((scored.json["result"] as? [String: Any])?["results"] as? [[String: Any]])?[0]["logprobs"] as? [Double]
        XCTAssertEqual(values.dropFirst().map { $0 as? Double }, want?.map { Optional($0) })
        XCTAssertEqual((lp["text_offset"] as? [Int])?.first, 0)
        // Streamed, the echo arrives as an event.
        let streamed = try call("/v1/completions", ["prompt": "for i in range(10):", "max_tokens": 0, "echo": true, "stream": true])
        XCTAssertTrue(streamed.body.contains(#""text":"for i in range(10):""#), streamed.body)
        XCTAssertTrue(streamed.body.hasSuffix("data: [DONE]\n\n"))
    }

    func testErrorsInOpenAIShape() throws {
        let wrongModel = try call("/v1/completions", ["model": "gpt-4", "prompt": "x"])
        XCTAssertEqual(wrongModel.status, 404)
        let bad = try call("/v1/completions", ["prompt": "x", "temperature": "hot"])
        XCTAssertEqual(bad.status, 400)
        let e = try XCTUnwrap(bad.json["error"] as? [String: Any])
        XCTAssertEqual(e["param"] as? String, "temperature")
        XCTAssertEqual(e["type"] as? String, "invalid_request_error")
        let unknown = try call("/v1/completions", ["prompt": "x", "frobnicate": 1])
        XCTAssertEqual((unknown.json["error"] as? [String: Any])?["param"] as? String, "frobnicate")
        let overflow = try call("/v1/completions", ["prompt": "x", "max_tokens": 10000])
        XCTAssertEqual(overflow.status, 400)
        XCTAssertTrue(overflow.body.contains("positions"), overflow.body)
    }
}
