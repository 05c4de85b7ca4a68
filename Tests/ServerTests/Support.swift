// Test helpers: a whole server (dispatcher, scheduler, libuv loop on its own thread) on loopback,
// and a blocking raw-socket client that reads Content-Length and chunked responses over TCP
// (IPv4 or IPv6) or a Unix domain socket.
import Foundation
import Models
import RPC
import Server
import TestSupport
import Tokenizer

/// A running server; `stop()` ends the scheduler and the loop.
final class TestServer: @unchecked Sendable {
    let scheduler: Scheduler
    let server: HTTPServer
    let thread: Thread

    init(model: String, modelDirectory: String? = nil, tokenizer: String? = nil, slots: Int = 2, capacity: Int = 16, apiKey: String? = nil,
         endpoints: [Endpoint] = [.tcp(host: "127.0.0.1", port: 0)], requestTimeoutMs: UInt64 = 10_000,
         idleTimeoutMs: UInt64 = 60_000, maxConnections: Int = 256, maxBodyBytes: Int = 64 << 20,
         configuration: Dispatcher.Configuration = Dispatcher.Configuration()) throws {
        let m = try TransformerModel.load(directory: modelDirectory ?? fixtureModel(model))
        let tok = try tokenizer.map { try Tokenizer(directory: fixturesDirectory + "/tokenizers/" + $0) }
        var config = configuration
        config.slots = slots
        config.capacity = capacity
        let sched = Scheduler(dispatcher: Dispatcher(model: m, tokenizer: tok, configuration: config))
        scheduler = sched
        server = try HTTPServer(endpoints: endpoints, maxBodyBytes: maxBodyBytes, requestTimeoutMs: requestTimeoutMs,
                                idleTimeoutMs: idleTimeoutMs, maxConnections: maxConnections,
                                onDisconnect: { sched.disconnected(owner: $0) },
                                handler: Router.makeHandler(scheduler: sched, apiKey: apiKey, modelName: "test-model"))
        scheduler.start()
        let s = server
        thread = Thread { s.run() }
        thread.start()
    }

    /// Stops both sides; true when the loop thread ended within 5 s.
    @discardableResult
    func stop() -> Bool {
        scheduler.stop()
        server.stop()
        let deadline = Date().addingTimeInterval(5)
        while !thread.isFinished && Date() < deadline { usleep(1000) }
        return thread.isFinished
    }
}

struct HTTPReply {
    let status: Int
    let headers: [String: String]
    let body: String
    var json: [String: Any] { (try? JSONSerialization.jsonObject(with: Data(body.utf8))) as? [String: Any] ?? [:] }
}

/// A blocking loopback client: sends bytes, reads `count` HTTP responses.
struct LoopbackClient {
    enum Address { case ipv4(Int), ipv6(Int), unix(String) }
    let address: Address

    init(port: Int) { address = .ipv4(port) }
    init(_ address: Address) { self.address = address }

    /// A connected socket (the caller closes it).
    func connectSocket() throws -> Int32 {
        let fd: Int32
        var rc: Int32
        switch address {
        case let .ipv4(port):
            fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_port = in_port_t(UInt16(port).bigEndian)
            addr.sin_addr.s_addr = inet_addr("127.0.0.1")
            rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        case let .ipv6(port):
            fd = socket(AF_INET6, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_in6()
            addr.sin6_family = sa_family_t(AF_INET6)
            addr.sin6_port = in_port_t(UInt16(port).bigEndian)
            addr.sin6_addr = in6addr_loopback
            rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) } }
        case let .unix(path):
            fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &addr.sun_path) { raw in
                for (i, b) in path.utf8.enumerated() where i < raw.count - 1 { raw[i] = b }
            }
            rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        }
        guard rc == 0 else { close(fd); throw ServerError.bind("connect failed: errno \(errno)") }
        var tv = timeval(tv_sec: 20, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        return fd
    }

    func exchange(_ request: String, responses count: Int) throws -> [(status: Int, body: String)] {
        try replies(request, count: count).map { ($0.status, $0.body) }
    }

    func replies(_ request: String, count: Int) throws -> [HTTPReply] {
        let fd = try connectSocket()
        defer { close(fd) }
        Self.send(fd, request)
        return Self.read(fd, count: count)
    }

    static func send(_ fd: Int32, _ request: String) {
        let bytes = Array(request.utf8)
        _ = bytes.withUnsafeBytes { Foundation.send(fd, $0.baseAddress, $0.count, 0) }
    }

    static func read(_ fd: Int32, count: Int) -> [HTTPReply] {
        var data = [UInt8]()
        var out: [HTTPReply] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while out.count < count {
            while out.count < count, let parsed = parseResponse(&data) { out.append(parsed) }
            if out.count == count { break }
            let n = recv(fd, &buf, buf.count, 0)
            if n <= 0 { break }
            data += buf[0..<n]
        }
        return out
    }

    static func parseResponse(_ data: inout [UInt8]) -> HTTPReply? {
        guard let headEnd = find(data, [13, 10, 13, 10], from: 0) else { return nil }
        let head = String(decoding: data[0..<headEnd], as: UTF8.self)
        let status = Int(head.split(separator: " ")[1]) ?? 0
        var headers: [String: String] = [:]
        for line in head.split(separator: "\r\n").dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        let start = headEnd + 4
        if headers["transfer-encoding"] == "chunked" {
            var at = start
            var body = [UInt8]()
            while true {
                guard let lineEnd = find(data, [13, 10], from: at) else { return nil }
                let size = Int(String(decoding: data[at..<lineEnd], as: UTF8.self), radix: 16) ?? 0
                guard data.count >= lineEnd + 2 + size + 2 else { return nil }
                body += data[(lineEnd + 2)..<(lineEnd + 2 + size)]
                at = lineEnd + 2 + size + 2
                if size == 0 { break }
            }
            data.removeFirst(at)
            return HTTPReply(status: status, headers: headers, body: String(decoding: body, as: UTF8.self))
        }
        let length = Int(headers["content-length"] ?? "0") ?? 0
        guard data.count >= start + length else { return nil }
        let body = String(decoding: data[start..<(start + length)], as: UTF8.self)
        data.removeFirst(start + length)
        return HTTPReply(status: status, headers: headers, body: body)
    }

    static func find(_ data: [UInt8], _ needle: [UInt8], from: Int) -> Int? {
        guard data.count >= needle.count else { return nil }
        var i = from
        while i + needle.count <= data.count {
            if data[i] == needle[0] && Array(data[i..<(i + needle.count)]) == needle { return i }
            i += 1
        }
        return nil
    }
}

/// An HTTP/1.1 POST of a JSON body.
func httpPost(_ json: String, path: String = "/rpc", close: Bool = false, auth: String? = nil) -> String {
    "POST \(path) HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: \(json.utf8.count)\r\n"
        + (close ? "Connection: close\r\n" : "") + (auth.map { "Authorization: Bearer \($0)\r\n" } ?? "") + "\r\n" + json
}

/// A JSON-RPC call body.
func rpcBody(_ method: String, _ params: [String: Any]? = nil, id: Any? = 1) -> String {
    var o: [String: Any] = ["jsonrpc": "2.0", "method": method]
    if let params { o["params"] = params }
    if let id { o["id"] = id }
    return String(decoding: try! JSONSerialization.data(withJSONObject: o), as: UTF8.self)
}

/// A small random qwen2 model whose vocabulary covers the fixture tokenizer `tokenizer`
/// (the fixture models have 96-token vocabularies), written once per process.
func modelForTokenizer(_ tokenizer: String, vocab: Int = 8192) throws -> String {
    let dir = NSTemporaryDirectory() + "ember-\(tokenizer)-model-\(getpid())"
    if FileManager.default.fileExists(atPath: dir + "/config.json") { return dir }
    let base = try Data(contentsOf: URL(fileURLWithPath: fixtureModel("qwen2_tied") + "/config.json"))
    var config = try JSONSerialization.jsonObject(with: base) as! [String: Any]
    config["vocab_size"] = vocab
    config["max_position_embeddings"] = 512
    let model = try TransformerModel(config: try JSONSerialization.data(withJSONObject: config))
    var rng = SeededRandom(seed: 11)
    let p = model.parameters.values
    for i in 0..<model.parameters.count { p[i] = 0.5 * rng.normal() }
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    try model.save(to: dir)
    return dir
}
