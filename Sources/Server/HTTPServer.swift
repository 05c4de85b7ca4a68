// Long on purpose (~570 lines): the libuv callbacks, the connection state machine and the outbox share state only the loop thread touches, kept private to this file.
// The libuv side of the server: one loop thread does all I/O (accept, read, parse, write) on TCP
// (IPv4, IPv6) and Unix-socket listeners. Complete requests go to a handler queue off the loop
// thread; responses (whole, or streamed in chunks) come back through a locked outbox and one
// uv_async_t, signalled on every post and drained completely (libuv guide, threads.rst).
// Responses on a connection leave in request order, so pipelining is safe.
import CLibUV
import Foundation

/// What a handler returns for one request.
public struct HTTPResponse: Sendable {
    public var status: Int
    public var contentType: String
    public var body: Data
    public var headers: [(String, String)]
    /// A large body sent from memory it does not copy (after `body`, which is then usually empty):
    /// written in slices as the socket drains, the bytes kept alive until the last slice is out.
    public var payload: SharedBytes?
    public init(status: Int, contentType: String = "application/json", body: Data = Data(), headers: [(String, String)] = [],
                payload: SharedBytes? = nil) {
        self.status = status; self.contentType = contentType; self.body = body; self.headers = headers; self.payload = payload
    }
}

/// Immutable bytes owned elsewhere (`owner` keeps them alive): a window into a published weights
/// snapshot, for instance. Sendable by hand: the bytes never change after creation.
public final class SharedBytes: @unchecked Sendable {
    public let base: UnsafeRawPointer
    public let count: Int
    let owner: AnyObject
    public init(base: UnsafeRawPointer, count: Int, owner: AnyObject) {
        self.base = base; self.count = count; self.owner = owner
    }
}

/// Where the server listens.
public enum Endpoint: Sendable, CustomStringConvertible {
    /// An IPv4 or IPv6 literal and a port (0 picks a free one).
    case tcp(host: String, port: Int)
    /// A Unix domain socket path (created with mode 0600, removed on stop).
    case unix(path: String)

    public var description: String {
        switch self {
        case let .tcp(h, p): "http://\(h.contains(":") ? "[\(h)]" : h):\(p)"
        case let .unix(path): "unix:\(path)"
        }
    }
}

/// Answers one request, from any thread, exactly once: `respond` with a whole response, or
/// `startStream`, any number of `send`, then `finish` (chunked transfer encoding).
/// Sendable by hand: its fields are constants; what it sends goes through the server's locked outbox.
public final class HTTPResponder: @unchecked Sendable {
    /// Weak: an answer that arrives after the server is gone is dropped.
    weak var server: HTTPServer?
    /// The connection the request came on (stable for its lifetime; used to cancel its work).
    public let connection: Int
    let seq: Int
    let keepAlive: Bool

    init(server: HTTPServer, connection: Int, seq: Int, keepAlive: Bool) {
        self.server = server; self.connection = connection; self.seq = seq; self.keepAlive = keepAlive
    }

    public func respond(_ response: HTTPResponse) {
        let head = HTTPServer.serialize(response, keepAlive: keepAlive)
        guard let payload = response.payload, payload.count > 0 else {
            server?.post(connection, seq, .bytes(head), final: true, keepAlive: keepAlive)
            return
        }
        server?.post(connection, seq, .bytes(head), final: false, keepAlive: keepAlive)
        server?.post(connection, seq, .payload(payload), final: true, keepAlive: keepAlive)
    }

    public func startStream(status: Int = 200, contentType: String, headers: [(String, String)] = []) {
        var head = "HTTP/1.1 \(status) \(HTTPServer.reason(status))\r\nContent-Type: \(contentType)\r\n"
        for (k, v) in headers { head += "\(k): \(v)\r\n" }
        head += "Transfer-Encoding: chunked\r\nConnection: \(keepAlive ? "keep-alive" : "close")\r\n\r\n"
        server?.post(connection, seq, .bytes(Data(head.utf8)), final: false, keepAlive: keepAlive)
    }

    public func send(_ chunk: Data) {
        guard !chunk.isEmpty else { return }
        var out = Data((String(chunk.count, radix: 16) + "\r\n").utf8)
        out.append(chunk)
        out.append(contentsOf: [13, 10])
        server?.post(connection, seq, .bytes(out), final: false, keepAlive: keepAlive)
    }

    public func finish() {
        server?.post(connection, seq, .bytes(Data("0\r\n\r\n".utf8)), final: true, keepAlive: keepAlive)
    }
}

/// Sendable by hand: libuv handles are touched on the loop thread only; other threads reach it
/// through `post` (a locked outbox and one uv_async_t) and `stop`.
public final class HTTPServer: @unchecked Sendable {
    public typealias Handler = @Sendable (HTTPRequest, HTTPResponder) -> Void

    let loop: UnsafeMutablePointer<uv_loop_t>
    var listeners: [(handle: UnsafeMutableRawPointer, isPipe: Bool)] = []
    let wakeup: UnsafeMutablePointer<uv_async_t>
    let handler: Handler
    /// Handlers run here, off the loop thread (JSON decoding of a large body takes time).
    let requests = DispatchQueue(label: "ember.requests")
    let maxBodyBytes: Int
    /// A connection that stops mid-request for this long is answered 408 and closed.
    let requestTimeoutMs: UInt64
    /// An idle keep-alive connection is closed after this long.
    let idleTimeoutMs: UInt64
    /// Connections beyond this are answered 503 and closed.
    let maxConnections: Int
    /// Called on the loop thread when a connection closes (its pending work can be cancelled).
    let onDisconnect: (@Sendable (Int) -> Void)?
    private let lock = NSLock()
    private var outbox: [(conn: Int, seq: Int, piece: Piece, final: Bool, keepAlive: Bool)] = []
    private var stopping = false
    private var stopStarted = false
    var connections: [Int: Connection] = [:]
    var nextConnectionId = 1
    var unixPaths: [String] = []
    private var loopThread: pthread_t?
    /// The bound TCP ports, in endpoint order (useful with port 0).
    public private(set) var ports: [Int] = []
    /// The first bound TCP port.
    public var port: Int { ports.first ?? 0 }

    /// Binds `host:port` (IPv4 or IPv6 literal); `run()` then serves until `stop()`.
    public convenience init(host: String = "127.0.0.1", port: Int, maxBodyBytes: Int = 64 << 20, requestTimeoutMs: UInt64 = 10_000,
                            idleTimeoutMs: UInt64 = 60_000, maxConnections: Int = 256, handler: @escaping Handler) throws {
        try self.init(endpoints: [.tcp(host: host, port: port)], maxBodyBytes: maxBodyBytes, requestTimeoutMs: requestTimeoutMs,
                      idleTimeoutMs: idleTimeoutMs, maxConnections: maxConnections, handler: handler)
    }

    /// Binds every endpoint; `run()` then serves them all until `stop()`. `onDisconnect` is
    /// called on the loop thread when a connection closes, with its id.
    public init(endpoints: [Endpoint], maxBodyBytes: Int = 64 << 20, requestTimeoutMs: UInt64 = 10_000,
                idleTimeoutMs: UInt64 = 60_000, maxConnections: Int = 256, onDisconnect: (@Sendable (Int) -> Void)? = nil,
                handler: @escaping Handler) throws {
        self.handler = handler
        self.onDisconnect = onDisconnect
        self.maxBodyBytes = maxBodyBytes
        self.requestTimeoutMs = requestTimeoutMs
        self.idleTimeoutMs = idleTimeoutMs
        self.maxConnections = maxConnections
        loop = .allocate(capacity: 1)
        uv_loop_init(loop)
        wakeup = .allocate(capacity: 1)
        uv_async_init(loop, wakeup) { handle in HTTPServer.from(handle!.pointee.data).drain() }
        let me = Unmanaged.passUnretained(self).toOpaque()
        wakeup.pointee.data = me
        do {
            for e in endpoints {
                switch e {
                case let .tcp(host, port): try bindTCP(host: host, port: port)
                case let .unix(path): try bindUnix(path)
                }
            }
        } catch {
            for l in listeners { uv_close(l.handle.assumingMemoryBound(to: uv_handle_t.self)) { $0?.deallocate() } }
            uv_close(UnsafeMutableRawPointer(wakeup).assumingMemoryBound(to: uv_handle_t.self), nil)
            uv_run(loop, UV_RUN_DEFAULT)
            loopClosed = uv_loop_close(loop) == 0
            throw error
        }
    }

    private func bindTCP(host: String, port: Int) throws {
        let tcp = UnsafeMutablePointer<uv_tcp_t>.allocate(capacity: 1)
        uv_tcp_init(loop, tcp)
        listeners.append((UnsafeMutableRawPointer(tcp), false))
        var storage = sockaddr_storage()
        let rc: Int32 = withUnsafeMutablePointer(to: &storage) { p in
            if host.contains(":") {
                return p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { uv_ip6_addr(host, Int32(port), $0) }
            }
            return p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { uv_ip4_addr(host, Int32(port), $0) }
        }
        guard rc == 0 else { throw ServerError.bind("invalid address \(host): \(String(cString: uv_strerror(rc)))") }
        let bound = withUnsafePointer(to: &storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { uv_tcp_bind(tcp, $0, host.contains(":") ? UInt32(UV_TCP_IPV6ONLY.rawValue) : 0) }
        }
        guard bound == 0 else { throw ServerError.bind("cannot bind \(host):\(port): \(String(cString: uv_strerror(bound)))") }
        try listen(UnsafeMutableRawPointer(tcp), what: "\(host):\(port)")
        var name = sockaddr_storage()
        var len = Int32(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &name) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { uv_tcp_getsockname(tcp, $0, &len) }
        }
        let family = Int32(name.ss_family)
        ports.append(withUnsafePointer(to: &name) { p -> Int in
            if family == AF_INET6 {
                return p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin6_port)) }
            }
            return p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin_port)) }
        })
    }

    private func bindUnix(_ path: String) throws {
        let pipe = UnsafeMutablePointer<uv_pipe_t>.allocate(capacity: 1)
        uv_pipe_init(loop, pipe, 0)
        listeners.append((UnsafeMutableRawPointer(pipe), true))
        // A socket file left by a previous run is replaced; any other file is not.
        var st = stat()
        if lstat(path, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFSOCK else { throw ServerError.bind("\(path) exists and is not a socket") }
            unlink(path)
        }
        let old = umask(0o177)
        let rc = uv_pipe_bind(pipe, path)
        umask(old)
        guard rc == 0 else { throw ServerError.bind("cannot bind unix:\(path): \(String(cString: uv_strerror(rc)))") }
        unixPaths.append(path)
        try listen(UnsafeMutableRawPointer(pipe), what: path)
    }

    private func listen(_ handle: UnsafeMutableRawPointer, what: String) throws {
        let stream = handle.assumingMemoryBound(to: uv_stream_t.self)
        stream.pointee.data = Unmanaged.passUnretained(self).toOpaque()
        let rc = uv_listen(stream, 511) { server, status in
            guard status == 0, let server else { return }
            HTTPServer.from(server.pointee.data).accept(server)
        }
        guard rc == 0 else { throw ServerError.bind("cannot listen on \(what): \(String(cString: uv_strerror(rc)))") }
    }

    static func from(_ data: UnsafeMutableRawPointer?) -> HTTPServer {
        Unmanaged<HTTPServer>.fromOpaque(data!).takeUnretainedValue()
    }

    /// Calls `handler` (on a background queue) when one of `signals` arrives. libuv installs the
    /// process-wide handler right away, so a signal sent as soon as this returns is not lost
    /// (a Dispatch signal source registers asynchronously). Call before `run()`.
    public func onSignals(_ signals: [Int32], _ handler: @escaping @Sendable () -> Void) {
        signalHandler = handler
        for sig in signals {
            let h = UnsafeMutablePointer<uv_signal_t>.allocate(capacity: 1)
            uv_signal_init(loop, h)
            h.pointee.data = Unmanaged.passUnretained(self).toOpaque()
            uv_signal_start(h, { h, _ in
                let server = HTTPServer.from(h!.pointee.data)
                if let f = server.signalHandler { DispatchQueue.global().async { f() } }
            }, sig)
            uv_unref(UnsafeMutableRawPointer(h).assumingMemoryBound(to: uv_handle_t.self))
            signalHandles.append(h)
        }
    }
    private var signalHandler: (@Sendable () -> Void)?
    private var signalHandles: [UnsafeMutablePointer<uv_signal_t>] = []

    /// Runs the loop on the calling thread until `stop()`.
    public func run() {
        loopThread = pthread_self()
        uv_run(loop, UV_RUN_DEFAULT)
        // Handles still closing (uv_close callbacks pending) need one more turn before the loop
        // can be closed and its memory freed.
        var rc = uv_loop_close(loop), turns = 0
        while rc == UV_EBUSY.rawValue && turns < 100 {
            uv_run(loop, UV_RUN_NOWAIT)
            rc = uv_loop_close(loop); turns += 1
        }
        loopClosed = rc == 0
    }

    /// False while a handle is still open in the loop (then its memory is not freed).
    private var loopClosed = false

    deinit {
        // run() returned with every handle closed (or init failed after closing them); a server
        // never run keeps its loop's memory rather than free it under open handles.
        if loopClosed {
            wakeup.deallocate()
            loop.deallocate()
        }
    }

    /// Stops accepting, lets responses already computed go out (at most `graceMs`), closes every
    /// connection and ends `run()`. Callable from any thread.
    public func stop() {
        lock.lock()
        defer { lock.unlock() }
        stopping = true
        if !wakeupClosed { uv_async_send(wakeup) }
    }

    /// Queues bytes of response `seq` on connection `conn` (any thread; on the loop thread itself
    /// the bytes go straight to the connection).
    func post(_ conn: Int, _ seq: Int, _ piece: Piece, final: Bool, keepAlive: Bool) {
        if let t = loopThread, pthread_equal(t, pthread_self()) != 0 {
            connections[conn]?.deliver(seq: seq, piece: piece, final: final, keepAlive: keepAlive)
            return
        }
        // The lock also keeps the wake-up handle open while it is signalled.
        lock.lock()
        defer { lock.unlock() }
        guard !wakeupClosed else { return }
        outbox.append((conn, seq, piece, final, keepAlive))
        uv_async_send(wakeup)
    }

    // MARK: - Loop thread

    func accept(_ listener: UnsafeMutablePointer<uv_stream_t>) {
        let isPipe = listeners.first { $0.handle == UnsafeMutableRawPointer(listener) }?.isPipe ?? false
        let conn = Connection(server: self, id: nextConnectionId, pipe: isPipe)
        nextConnectionId += 1
        let ok = uv_accept(listener, conn.stream)
        connections[conn.id] = conn
        guard ok == 0, !stopStarted else { conn.close(); return }
        if connections.count > maxConnections {
            let body = Data(#"{"error":"too many connections"}"#.utf8)
            conn.deliver(seq: 0, piece: .bytes(Self.serialize(HTTPResponse(status: 503, body: body), keepAlive: false)), final: true, keepAlive: false)
            return
        }
        conn.startReading()
    }

    /// A request is complete: small ones are handled right here (decoding a few kilobytes of JSON
    /// costs less than a thread hop), larger ones off the loop thread.
    func dispatch(_ request: HTTPRequest, from conn: Connection, seq: Int) {
        let responder = HTTPResponder(server: self, connection: conn.id, seq: seq, keepAlive: request.keepAlive)
        let handler = self.handler
        if request.body.count <= inlineBodyBytes { handler(request, responder) }
        else { requests.async { handler(request, responder) } }
    }
    let inlineBodyBytes = 16 << 10

    /// Drains every posted response (runs on the loop thread).
    func drain() {
        lock.lock()
        let items = outbox
        outbox = []
        let stop = stopping
        lock.unlock()
        for i in items { connections[i.conn]?.deliver(seq: i.seq, piece: i.piece, final: i.final, keepAlive: i.keepAlive) }
        if stop && !stopStarted {
            stopStarted = true
            for l in listeners { uv_close(l.handle.assumingMemoryBound(to: uv_handle_t.self)) { $0?.deallocate() } }
            for h in signalHandles { uv_close(UnsafeMutableRawPointer(h).assumingMemoryBound(to: uv_handle_t.self)) { $0?.deallocate() } }
            signalHandles = []
            for p in unixPaths { unlink(p) }
            for c in Array(connections.values) { c.closeWhenDone() }
            // Whatever is still unanswered after the grace period is cut off.
            let grace = UnsafeMutablePointer<uv_timer_t>.allocate(capacity: 1)
            uv_timer_init(loop, grace)
            grace.pointee.data = Unmanaged.passUnretained(self).toOpaque()
            uv_timer_start(grace, { t in
                let server = HTTPServer.from(t!.pointee.data)
                for c in Array(server.connections.values) { c.close() }
                server.finishStop()
            }, 5_000, 0)
            uv_unref(UnsafeMutableRawPointer(grace).assumingMemoryBound(to: uv_handle_t.self))
            graceTimer = grace
        }
        if stopStarted && connections.isEmpty { finishStop() }
    }

    /// The grace-period timer of a stop in progress (loop thread).
    private var graceTimer: UnsafeMutablePointer<uv_timer_t>?
    /// Set (under the lock) when the wake-up handle is closed; posts after that are dropped.
    private var wakeupClosed = false
    /// Closes the wake-up handle once no connection is left (then `run()` returns).
    func finishStop() {
        lock.lock()
        let already = wakeupClosed
        wakeupClosed = true
        lock.unlock()
        guard !already else { return }
        if let g = graceTimer {
            // Closed with the rest, so run() returns with no handle open and the loop is freed.
            uv_timer_stop(g)
            uv_close(UnsafeMutableRawPointer(g).assumingMemoryBound(to: uv_handle_t.self)) { $0?.deallocate() }
            graceTimer = nil
        }
        uv_close(UnsafeMutableRawPointer(wakeup).assumingMemoryBound(to: uv_handle_t.self), nil)
    }

    /// A connection closed.
    func closed(_ conn: Connection) {
        connections[conn.id] = nil
        onDisconnect?(conn.id)
        if stopStarted && connections.isEmpty { finishStop() }
    }

    static func serialize(_ r: HTTPResponse, keepAlive: Bool) -> Data {
        var head = "HTTP/1.1 \(r.status) \(reason(r.status))\r\n"
        if r.status != 204 && r.status != 304 {
            head += "Content-Type: \(r.contentType)\r\nContent-Length: \(r.body.count + (r.payload?.count ?? 0))\r\n"
        }
        for (k, v) in r.headers { head += "\(k): \(v)\r\n" }
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
        case 206: "Partial Content"
        case 304: "Not Modified"
        case 400: "Bad Request"
        case 401: "Unauthorized"
        case 404: "Not Found"
        case 405: "Method Not Allowed"
        case 413: "Content Too Large"
        case 408: "Request Timeout"
        case 412: "Precondition Failed"
        case 416: "Range Not Satisfiable"
        case 431: "Request Header Fields Too Large"
        case 500: "Internal Server Error"
        case 503: "Service Unavailable"
        default: "Status"
        }
    }
}

public enum ServerError: Error, CustomStringConvertible {
    case bind(String)
    public var description: String { switch self { case let .bind(s): s } }
}

/// Part of a response on its way to the socket.
enum Piece {
    case bytes(Data)
    case payload(SharedBytes)
}

/// A payload slice in flight: the connection to continue and the bytes to keep alive.
/// Sendable by hand: created and released on the loop thread.
final class SliceWrite: @unchecked Sendable {
    let connection: Connection
    let bytes: SharedBytes
    init(connection: Connection, bytes: SharedBytes) { self.connection = connection; self.bytes = bytes }
}

/// One client connection.
/// Sendable by hand: created, read and freed on the loop thread only (libuv callbacks).
final class Connection: @unchecked Sendable {
    unowned let server: HTTPServer
    let id: Int
    /// A uv_tcp_t or uv_pipe_t.
    let handle: UnsafeMutableRawPointer
    let timer: UnsafeMutablePointer<uv_timer_t>
    let parser: HTTPRequestParser
    var nextSeq = 0, nextToSend = 0
    /// Pieces of responses not yet written, by sequence number; `final` once the response is whole.
    var ready: [Int: (pieces: [Piece], final: Bool, keepAlive: Bool)] = [:]
    var closing = false
    var shuttingDown = false
    /// Stop reading; close once every response owed is written.
    var draining = false

    init(server: HTTPServer, id: Int, pipe: Bool) {
        self.server = server
        self.id = id
        parser = HTTPRequestParser(maxBodyBytes: server.maxBodyBytes)
        let size = max(MemoryLayout<uv_tcp_t>.size, MemoryLayout<uv_pipe_t>.size)
        handle = .allocate(byteCount: size, alignment: 16)
        handle.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        if pipe { uv_pipe_init(server.loop, handle.assumingMemoryBound(to: uv_pipe_t.self), 0) }
        else { uv_tcp_init(server.loop, handle.assumingMemoryBound(to: uv_tcp_t.self)) }
        timer = .allocate(capacity: 1)
        timer.initialize(to: uv_timer_t())
        uv_timer_init(server.loop, timer)
        let me = Unmanaged.passRetained(self).toOpaque()
        stream.pointee.data = me
        timer.pointee.data = me
    }

    /// When the request now arriving began (loop time, ms): the request timeout is a deadline
    /// from there, so a client trickling a byte at a time (slow loris) cannot extend it.
    var requestStartedMs: UInt64 = 0

    /// (Re)arms the timer: what is left of the request deadline while a request is arriving,
    /// else the idle timeout.
    func arm() {
        var ms = server.idleTimeoutMs
        if parser.isMidRequest {
            let elapsed = uv_now(server.loop) &- requestStartedMs
            ms = elapsed >= server.requestTimeoutMs ? 1 : server.requestTimeoutMs - elapsed
        }
        uv_timer_start(timer, { t in Connection.from(t!.pointee.data).timedOut() }, ms, 0)
    }

    func timedOut() {
        guard !closing else { return }
        if parser.isMidRequest {
            // Answered 408 after the responses still owed; nothing more is read.
            let body = Data(#"{"error":"request not completed in time"}"#.utf8)
            draining = true
            uv_read_stop(stream)
            deliver(seq: nextSeq, piece: .bytes(HTTPServer.serialize(HTTPResponse(status: 408, body: body), keepAlive: false)), final: true, keepAlive: false)
            nextSeq += 1
        } else if nextToSend < nextSeq {
            arm()                                   // a response is being computed: not idle
        } else {
            close()
        }
    }

    static func from(_ data: UnsafeMutableRawPointer?) -> Connection {
        Unmanaged<Connection>.fromOpaque(data!).takeUnretainedValue()
    }

    var stream: UnsafeMutablePointer<uv_stream_t> { handle.assumingMemoryBound(to: uv_stream_t.self) }

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
        guard !closing, !draining else { return }
        defer { if !closing { arm() } }
        do {
            let wasMid = parser.isMidRequest
            let requests = try parser.feed(bytes)
            if parser.isMidRequest && (!wasMid || !requests.isEmpty) { requestStartedMs = uv_now(server.loop) }
            for r in requests {
                server.dispatch(r, from: self, seq: nextSeq)
                nextSeq += 1
            }
            if parser.expectsContinue { write(Data("HTTP/1.1 100 Continue\r\n\r\n".utf8)) }
        } catch let e as HTTPParseError {
            // Answer in order after what is already queued, then close.
            let body = Data("{\"error\":\"\(e.description)\"}".utf8)
            deliver(seq: nextSeq, piece: .bytes(HTTPServer.serialize(HTTPResponse(status: e.status, body: body), keepAlive: false)), final: true, keepAlive: false)
            nextSeq += 1
        } catch {
            close()
        }
    }

    /// Queues a piece of response `seq`; writes whatever is next in order.
    func deliver(seq: Int, piece: Piece, final: Bool, keepAlive: Bool) {
        guard !closing, !shuttingDown else { return }
        var entry = ready[seq] ?? ([], false, keepAlive)
        entry.pieces.append(piece)
        entry.final = final
        entry.keepAlive = keepAlive
        ready[seq] = entry
        flush()
    }

    /// Writes the pieces owed in order; stops while a payload is being streamed (its last slice's
    /// write completion calls back here).
    func flush() {
        while streaming == nil, !closing, var e = ready[nextToSend] {
            while streaming == nil, !e.pieces.isEmpty {
                switch e.pieces.removeFirst() {
                case let .bytes(b): write(b)
                case let .payload(p): streaming = (p, 0); pump(inFlush: true)
                }
            }
            guard streaming == nil, e.final else { ready[nextToSend] = e; return }
            ready[nextToSend] = nil
            nextToSend += 1
            if !e.keepAlive { shutdownAndClose(); return }
            // Idle from the last answer on, not from when its request arrived: a call that ran
            // longer than the idle timeout must not find its connection closed right after.
            if nextToSend == nextSeq && !parser.isMidRequest { arm() }
        }
        if streaming == nil && draining && nextToSend == nextSeq { shutdownAndClose() }
    }

    /// The payload being written and the offset of its next slice.
    var streaming: (bytes: SharedBytes, offset: Int)?
    static let sliceBytes = 4 << 20, queuedBytes = 16 << 20

    /// Queues slices of the streaming payload while libuv holds less than `queuedBytes`; each
    /// slice points into the payload (no copy) and keeps it alive until written.
    func pump(inFlush: Bool = false) {
        guard var (p, offset) = streaming, !closing else { return }
        while offset < p.count && uv_stream_get_write_queue_size(stream) < Self.queuedBytes {
            let n = min(Self.sliceBytes, p.count - offset)
            let req = UnsafeMutablePointer<uv_write_t>.allocate(capacity: 1)
            req.pointee.data = Unmanaged.passRetained(SliceWrite(connection: self, bytes: p)).toOpaque()
            var buf = uv_buf_init(UnsafeMutablePointer(mutating: p.base.assumingMemoryBound(to: CChar.self) + offset), UInt32(n))
            let rc = uv_write(req, stream, &buf, 1) { req, status in
                let w = Unmanaged<SliceWrite>.fromOpaque(req!.pointee.data).takeRetainedValue()
                req!.deallocate()
                if status == 0 && !w.connection.closing { w.connection.pump() }
            }
            if rc != 0 {
                Unmanaged<SliceWrite>.fromOpaque(req.pointee.data).release()
                req.deallocate()
                streaming = nil
                close()
                return
            }
            offset += n
        }
        if offset < p.count { streaming = (p, offset); return }
        // Everything is queued: the response can complete, and what follows it can be written.
        streaming = nil
        if !inFlush { flush() }
    }

    /// Server stopping: no new requests; close after the responses owed are written.
    func closeWhenDone() {
        guard !closing else { return }
        draining = true
        uv_read_stop(stream)
        if nextToSend == nextSeq && streaming == nil { shutdownAndClose() }
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

    /// Closes after every queued write has gone out.
    func shutdownAndClose() {
        guard !closing, !shuttingDown else { return }
        shuttingDown = true
        let req = UnsafeMutablePointer<uv_shutdown_t>.allocate(capacity: 1)
        req.pointee.data = Unmanaged.passUnretained(self).toOpaque()
        let rc = uv_shutdown(req, stream) { req, _ in
            let conn = Connection.from(req!.pointee.data)
            req!.deallocate()
            conn.close()
        }
        if rc != 0 { req.deallocate(); close() }
        else { uv_timer_stop(timer) }
    }

    func close() {
        guard !closing else { return }
        closing = true
        server.closed(self)
        uv_timer_stop(timer)
        uv_close(UnsafeMutableRawPointer(timer).assumingMemoryBound(to: uv_handle_t.self)) { h in h!.deallocate() }
        uv_close(handle.assumingMemoryBound(to: uv_handle_t.self)) { handle in
            let raw = handle!
            Unmanaged<Connection>.fromOpaque(raw.pointee.data!).release()
            raw.deallocate()
        }
    }
}
