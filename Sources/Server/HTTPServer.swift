// The libuv side of the server: one loop thread does all I/O (accept, read, parse, write); one
// serial compute queue runs request handlers; results come back through a locked outbox and one
// uv_async_t, signalled on every post and drained completely (libuv guide, threads.rst).
// Responses on a connection leave in request order, so pipelining is safe.
import CLibUV
import Foundation

/// What a handler returns for one request.
public struct HTTPResponse: Sendable {
    public var status: Int
    public var contentType: String
    public var body: Data
    public init(status: Int, contentType: String = "application/json", body: Data = Data()) {
        self.status = status; self.contentType = contentType; self.body = body
    }
}

public final class HTTPServer: @unchecked Sendable {
    public typealias Handler = @Sendable (HTTPRequest) -> HTTPResponse

    let loop: UnsafeMutablePointer<uv_loop_t>
    let listener: UnsafeMutablePointer<uv_tcp_t>
    let wakeup: UnsafeMutablePointer<uv_async_t>
    let handler: Handler
    let compute = DispatchQueue(label: "ember.compute")
    let maxBodyBytes: Int
    /// A connection that stops mid-request for this long is answered 408 and closed.
    let requestTimeoutMs: UInt64
    /// An idle keep-alive connection is closed after this long.
    let idleTimeoutMs: UInt64
    /// Connections beyond this are answered 503 and closed.
    let maxConnections: Int
    private let lock = NSLock()
    private var outbox: [(Connection, Int, Data, Bool)] = []
    private var stopping = false
    var connections: [ObjectIdentifier: Connection] = [:]
    /// The bound port (useful with port 0).
    public private(set) var port: Int = 0

    /// Binds `host:port` (IPv4 or IPv6 literal); `run()` then serves until `stop()`.
    public init(host: String = "127.0.0.1", port: Int, maxBodyBytes: Int = 64 << 20, requestTimeoutMs: UInt64 = 10_000,
                idleTimeoutMs: UInt64 = 60_000, maxConnections: Int = 256, handler: @escaping Handler) throws {
        self.handler = handler
        self.maxBodyBytes = maxBodyBytes
        self.requestTimeoutMs = requestTimeoutMs
        self.idleTimeoutMs = idleTimeoutMs
        self.maxConnections = maxConnections
        loop = .allocate(capacity: 1)
        uv_loop_init(loop)
        listener = .allocate(capacity: 1)
        uv_tcp_init(loop, listener)
        wakeup = .allocate(capacity: 1)
        uv_async_init(loop, wakeup) { handle in HTTPServer.from(handle!.pointee.data).drain() }
        var storage = sockaddr_storage()
        let rc: Int32 = withUnsafeMutablePointer(to: &storage) { p in
            if host.contains(":") {
                return p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { uv_ip6_addr(host, Int32(port), $0) }
            }
            return p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { uv_ip4_addr(host, Int32(port), $0) }
        }
        guard rc == 0 else { throw ServerError.bind("invalid address \(host): \(String(cString: uv_strerror(rc)))") }
        let bound = withUnsafePointer(to: &storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { uv_tcp_bind(listener, $0, 0) }
        }
        guard bound == 0 else { throw ServerError.bind("cannot bind \(host):\(port): \(String(cString: uv_strerror(bound)))") }
        let me = Unmanaged.passUnretained(self).toOpaque()
        listener.pointee.data = me
        wakeup.pointee.data = me
        let listening = listener.withMemoryRebound(to: uv_stream_t.self, capacity: 1) { stream in
            uv_listen(stream, 511) { server, status in
                guard status == 0, let server else { return }
                HTTPServer.from(server.pointee.data).accept(server)
            }
        }
        guard listening == 0 else { throw ServerError.bind("cannot listen: \(String(cString: uv_strerror(listening)))") }
        var name = sockaddr_storage()
        var len = Int32(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &name) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { uv_tcp_getsockname(listener, $0, &len) }
        }
        let family = Int32(name.ss_family)
        self.port = withUnsafePointer(to: &name) { p -> Int in
            if family == AF_INET6 {
                return p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin6_port)) }
            }
            return p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin_port)) }
        }
    }

    static func from(_ data: UnsafeMutableRawPointer?) -> HTTPServer {
        Unmanaged<HTTPServer>.fromOpaque(data!).takeUnretainedValue()
    }

    /// Runs the loop on the calling thread until `stop()`.
    public func run() {
        uv_run(loop, UV_RUN_DEFAULT)
        uv_loop_close(loop)
    }

    /// Stops accepting, closes connections and ends `run()` (callable from any thread).
    public func stop() {
        lock.lock(); stopping = true; lock.unlock()
        uv_async_send(wakeup)
    }

    // MARK: - Loop thread

    func accept(_ server: UnsafeMutablePointer<uv_stream_t>) {
        let conn = Connection(server: self)
        uv_tcp_init(loop, conn.tcp)
        let ok = conn.tcp.withMemoryRebound(to: uv_stream_t.self, capacity: 1) { uv_accept(server, $0) }
        connections[ObjectIdentifier(conn)] = conn
        guard ok == 0 else { conn.close(); return }
        if connections.count > maxConnections {
            let body = Data(#"{"error":"too many connections"}"#.utf8)
            conn.deliver(seq: 0, bytes: Self.serialize(HTTPResponse(status: 503, body: body), keepAlive: false), keepAlive: false)
            return
        }
        conn.startReading()
    }

    /// A request is complete: run it on the compute queue, post the response back.
    func dispatch(_ request: HTTPRequest, from conn: Connection, seq: Int) {
        let handler = self.handler
        compute.async { [self] in
            let response = handler(request)
            let bytes = Self.serialize(response, keepAlive: request.keepAlive)
            lock.lock()
            outbox.append((conn, seq, bytes, request.keepAlive))
            lock.unlock()
            uv_async_send(wakeup)
        }
    }

    /// Drains every posted response (runs on the loop thread).
    func drain() {
        lock.lock()
        let items = outbox
        outbox = []
        let stop = stopping
        lock.unlock()
        for (conn, seq, bytes, keepAlive) in items { conn.deliver(seq: seq, bytes: bytes, keepAlive: keepAlive) }
        if stop {
            for c in connections.values { c.close() }
            uv_close(UnsafeMutableRawPointer(listener).assumingMemoryBound(to: uv_handle_t.self), nil)
            uv_close(UnsafeMutableRawPointer(wakeup).assumingMemoryBound(to: uv_handle_t.self), nil)
        }
    }

    static func serialize(_ r: HTTPResponse, keepAlive: Bool) -> Data {
        var head = "HTTP/1.1 \(r.status) \(reason(r.status))\r\n"
        if r.status != 204 {
            head += "Content-Type: \(r.contentType)\r\nContent-Length: \(r.body.count)\r\n"
        }
        head += "Connection: \(keepAlive ? "keep-alive" : "close")\r\n\r\n"
        var out = Data(head.utf8)
        out.append(r.body)
        return out
    }

    static func reason(_ status: Int) -> String {
        switch status {
        case 100: "Continue"
        case 200: "OK"
        case 204: "No Content"
        case 400: "Bad Request"
        case 401: "Unauthorized"
        case 404: "Not Found"
        case 405: "Method Not Allowed"
        case 413: "Content Too Large"
        case 408: "Request Timeout"
        case 431: "Request Header Fields Too Large"
        case 503: "Service Unavailable"
        default: "Status"
        }
    }
}

public enum ServerError: Error, CustomStringConvertible {
    case bind(String)
    public var description: String { switch self { case let .bind(s): s } }
}

/// One client connection (loop thread only).
final class Connection: @unchecked Sendable {
    unowned let server: HTTPServer
    let tcp: UnsafeMutablePointer<uv_tcp_t>
    let timer: UnsafeMutablePointer<uv_timer_t>
    let parser: HTTPRequestParser
    var nextSeq = 0, nextToSend = 0
    var ready: [Int: (Data, Bool)] = [:]
    var closing = false

    init(server: HTTPServer) {
        self.server = server
        parser = HTTPRequestParser(maxBodyBytes: server.maxBodyBytes)
        tcp = .allocate(capacity: 1)
        tcp.initialize(to: uv_tcp_t())
        timer = .allocate(capacity: 1)
        timer.initialize(to: uv_timer_t())
        uv_timer_init(server.loop, timer)
        let me = Unmanaged.passRetained(self).toOpaque()
        tcp.pointee.data = me
        timer.pointee.data = me
    }

    /// (Re)arms the timer: the request timeout while a request is arriving, else the idle one.
    func arm() {
        let ms = parser.isMidRequest ? server.requestTimeoutMs : server.idleTimeoutMs
        uv_timer_start(timer, { t in Connection.from(t!.pointee.data).timedOut() }, ms, 0)
    }

    func timedOut() {
        guard !closing else { return }
        if nextToSend < nextSeq { arm(); return }      // a response is being computed: not idle
        if parser.isMidRequest {
            let body = Data(#"{"error":"request not completed in time"}"#.utf8)
            deliver(seq: nextSeq, bytes: HTTPServer.serialize(HTTPResponse(status: 408, body: body), keepAlive: false), keepAlive: false)
            nextSeq += 1
        } else {
            close()
        }
    }

    static func from(_ data: UnsafeMutableRawPointer?) -> Connection {
        Unmanaged<Connection>.fromOpaque(data!).takeUnretainedValue()
    }

    var stream: UnsafeMutablePointer<uv_stream_t> { UnsafeMutableRawPointer(tcp).assumingMemoryBound(to: uv_stream_t.self) }

    func startReading() {
        arm()
        uv_read_start(stream, { _, suggested, buf in
            buf!.pointee = uv_buf_init(UnsafeMutablePointer<CChar>.allocate(capacity: suggested), UInt32(suggested))
        }, { stream, nread, buf in
            let conn = Connection.from(stream!.pointee.data)
            defer { buf?.pointee.base?.deallocate() }
            if nread < 0 { conn.close(); return }
            if nread == 0 { return }
            conn.received(UnsafeRawBufferPointer(start: buf!.pointee.base, count: nread))
        })
    }

    func received(_ bytes: UnsafeRawBufferPointer) {
        guard !closing else { return }
        defer { if !closing { arm() } }
        do {
            let requests = try parser.feed(bytes)
            for r in requests {
                server.dispatch(r, from: self, seq: nextSeq)
                nextSeq += 1
            }
            if parser.expectsContinue { write(Data("HTTP/1.1 100 Continue\r\n\r\n".utf8)) }
        } catch let e as HTTPParseError {
            // Answer in order after what is already queued, then close.
            let body = Data("{\"error\":\"\(e.description)\"}".utf8)
            deliver(seq: nextSeq, bytes: HTTPServer.serialize(HTTPResponse(status: e.status, body: body), keepAlive: false), keepAlive: false)
            nextSeq += 1
        } catch {
            close()
        }
    }

    /// Queues response `seq`; writes every response that is next in order.
    func deliver(seq: Int, bytes: Data, keepAlive: Bool) {
        guard !closing else { return }
        ready[seq] = (bytes, keepAlive)
        while let (b, keep) = ready.removeValue(forKey: nextToSend) {
            write(b)
            nextToSend += 1
            if !keep { close(); return }
        }
    }

    func write(_ bytes: Data) {
        let req = UnsafeMutablePointer<uv_write_t>.allocate(capacity: 1)
        let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: max(1, bytes.count))
        bytes.withUnsafeBytes { raw in
            if let base = raw.baseAddress { UnsafeMutableRawPointer(buffer).copyMemory(from: base, byteCount: bytes.count) }
        }
        req.pointee.data = UnsafeMutableRawPointer(buffer)
        var buf = uv_buf_init(buffer, UInt32(bytes.count))
        let rc = uv_write(req, stream, &buf, 1) { req, _ in
            req!.pointee.data.assumingMemoryBound(to: CChar.self).deallocate()
            req!.deallocate()
        }
        if rc != 0 { buffer.deallocate(); req.deallocate(); close() }
    }

    func close() {
        guard !closing else { return }
        closing = true
        server.connections[ObjectIdentifier(self)] = nil
        uv_timer_stop(timer)
        uv_close(UnsafeMutableRawPointer(timer).assumingMemoryBound(to: uv_handle_t.self)) { h in h!.deallocate() }
        uv_close(UnsafeMutableRawPointer(tcp).assumingMemoryBound(to: uv_handle_t.self)) { handle in
            let raw = handle!
            Unmanaged<Connection>.fromOpaque(raw.pointee.data!).release()
            raw.deallocate()
        }
    }
}
