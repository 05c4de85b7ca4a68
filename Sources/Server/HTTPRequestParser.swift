// HTTP/1.1 request framing on top of http_parser (Debian libhttp-parser-dev 2.9): bytes in,
// complete requests out, any number per read (pipelining). Header and body sizes are bounded;
// malformed framing — including Content-Length together with Transfer-Encoding, the request
// smuggling case — is an error that the connection answers with 400 and closes.
import CHTTPParser
import Foundation

public struct HTTPRequest: Sendable {
    public var method: String
    public var target: String
    public var headers: [(name: String, value: String)]
    public var body: Data
    /// HTTP/1.1 keep-alive semantics (Connection header and version).
    public var keepAlive: Bool

    /// First value of a header, case-insensitively.
    public func header(_ name: String) -> String? {
        headers.first { $0.name.caseInsensitiveCompare(name) == .orderedSame }?.value
    }

    /// The target without its query string.
    public var path: String { String(target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? "") }
}

public enum HTTPParseError: Error, Equatable, CustomStringConvertible {
    /// Bad framing; answer 400.
    case malformed(String)
    /// Request line plus headers over the limit; answer 431.
    case headersTooLarge(limit: Int)
    /// Body over the limit; answer 413.
    case bodyTooLarge(limit: Int)

    public var status: Int {
        switch self {
        case .malformed: 400
        case .headersTooLarge: 431
        case .bodyTooLarge: 413
        }
    }

    public var description: String {
        switch self {
        case let .malformed(r): "malformed request: \(r)"
        case let .headersTooLarge(l): "request headers exceed \(l) bytes"
        case let .bodyTooLarge(l): "request body exceeds \(l) bytes"
        }
    }
}

public final class HTTPRequestParser {
    public let maxHeaderBytes: Int
    public let maxBodyBytes: Int
    // Heap-allocated so callbacks can read the parser's state while http_parser_execute holds it
    // (a stored struct passed inout would be an overlapping access).
    private let parser: UnsafeMutablePointer<http_parser> = .allocate(capacity: 1)
    private let settings: UnsafeMutablePointer<http_parser_settings> = .allocate(capacity: 1)
    private var completed: [HTTPRequest] = []
    private var current = HTTPRequest(method: "", target: "", headers: [], body: Data(), keepAlive: true)
    private var field = "", value = "", lastWasValue = false
    private var headerBytes = 0
    private var failure: HTTPParseError?
    // Obsolete line folding (a header line continued on the next line that starts with a space)
    // is refused, as RFC 9112 allows, rather than joined: a proxy in front may read it otherwise.
    // The bytes between the header spans http_parser reports are checked for "\n" + SP/HTAB.
    private var bufferStart: UnsafePointer<CChar>?
    private var spanEnd: UnsafePointer<CChar>?
    private var carriedLF = false
    private var inHeaders = false
    private var firstSpan = false
    /// True after the headers of a request with `Expect: 100-continue` arrived and its body has
    /// not: the connection should send `100 Continue` once.
    public private(set) var expectsContinue = false

    public init(maxHeaderBytes: Int = 16 << 10, maxBodyBytes: Int = 64 << 20) {
        self.maxHeaderBytes = maxHeaderBytes
        self.maxBodyBytes = maxBodyBytes
        parser.initialize(to: http_parser())
        settings.initialize(to: http_parser_settings())
        http_parser_init(parser, HTTP_REQUEST)
        http_parser_settings_init(settings)
        settings.pointee.on_message_begin = { p in HTTPRequestParser.this(p).beginMessage(); return 0 }
        settings.pointee.on_url = { p, at, n in HTTPRequestParser.this(p).url(at, n) }
        settings.pointee.on_header_field = { p, at, n in HTTPRequestParser.this(p).headerField(at, n) }
        settings.pointee.on_header_value = { p, at, n in HTTPRequestParser.this(p).headerValue(at, n) }
        settings.pointee.on_headers_complete = { p in HTTPRequestParser.this(p).headersComplete() }
        settings.pointee.on_body = { p, at, n in HTTPRequestParser.this(p).body(at, n) }
        settings.pointee.on_message_complete = { p in HTTPRequestParser.this(p).messageComplete() }
    }

    deinit {
        parser.deallocate()
        settings.deallocate()
    }

    private static func this(_ p: UnsafeMutablePointer<http_parser>?) -> HTTPRequestParser {
        Unmanaged<HTTPRequestParser>.fromOpaque(p!.pointee.data).takeUnretainedValue()
    }

    /// Feeds bytes; returns the requests they completed. After an error the parser stays failed.
    public func feed(_ bytes: UnsafeRawBufferPointer) throws -> [HTTPRequest] {
        if let f = failure { throw f }
        parser.pointee.data = Unmanaged.passUnretained(self).toOpaque()
        let consumed = bytes.withMemoryRebound(to: CChar.self) { chars -> Int in
            bufferStart = chars.baseAddress.map { UnsafePointer($0) }
            spanEnd = nil
            let consumed = http_parser_execute(parser, settings, chars.baseAddress, chars.count)
            if inHeaders, !firstSpan, failure == nil, let base = bufferStart, chars.count > 0 {
                // The unreported tail of this buffer: check it, and carry whether it ended in LF.
                if !scanFold(spanEnd ?? base, base + chars.count) {
                    failure = .malformed("obsolete line folding in a header")
                }
            }
            bufferStart = nil; spanEnd = nil
            return consumed
        }
        if let f = failure { throw f }
        let errno = parser.pointee.http_errno
        if errno != 0 || consumed != bytes.count {
            let name = String(cString: http_errno_description(http_errno(rawValue: errno)))
            failure = .malformed(name)
            throw failure!
        }
        defer { completed = [] }
        return completed
    }

    public func feed(_ data: Data) throws -> [HTTPRequest] {
        try data.withUnsafeBytes { try feed($0) }
    }

    /// True when a request has started but not completed (a timeout then means a stalled client).
    public var isMidRequest: Bool { headerBytes > 0 || !current.method.isEmpty }

    // MARK: - Callbacks (return non-zero to stop the parser)

    private func fail(_ e: HTTPParseError) -> Int32 { failure = e; return 1 }

    private func beginMessage() {
        current = HTTPRequest(method: "", target: "", headers: [], body: Data(), keepAlive: true)
        field = ""; value = ""; lastWasValue = false; headerBytes = 1
        expectsContinue = false
        inHeaders = true; carriedLF = false; firstSpan = true
    }

    /// Scans header bytes for a line feed followed by a space or tab; false on an obs-fold.
    private func scanFold(_ from: UnsafePointer<CChar>, _ to: UnsafePointer<CChar>) -> Bool {
        var p = from
        while p < to {
            let c = p.pointee
            if carriedLF && (c == 32 || c == 9) { return false }
            carriedLF = c == 10
            p += 1
        }
        return true
    }

    /// Checks the bytes between the previous reported span and `at` (a span of `n` bytes).
    private func checkGap(before at: UnsafePointer<CChar>?, count n: Int) -> Bool {
        guard let at else { return true }
        defer { spanEnd = at + n; carriedLF = false; firstSpan = false }
        // Before a message's first span (its URL) lie the method and, in the same buffer, the
        // previous message's bytes: nothing to check.
        if firstSpan { return true }
        guard scanFold(spanEnd ?? bufferStart ?? at, at) else { return false }
        return !(carriedLF && n > 0 && (at.pointee == 32 || at.pointee == 9))
    }

    private func append(_ s: inout String, _ at: UnsafePointer<CChar>?, _ n: Int) -> Int32 {
        guard checkGap(before: at, count: n) else { return fail(.malformed("obsolete line folding in a header")) }
        headerBytes += n
        if headerBytes > maxHeaderBytes { return fail(.headersTooLarge(limit: maxHeaderBytes)) }
        s += String(decoding: UnsafeRawBufferPointer(start: at, count: n), as: UTF8.self)
        return 0
    }

    private func url(_ at: UnsafePointer<CChar>?, _ n: Int) -> Int32 {
        var t = current.target
        defer { current.target = t }
        return append(&t, at, n)
    }

    private func headerField(_ at: UnsafePointer<CChar>?, _ n: Int) -> Int32 {
        if lastWasValue { current.headers.append((field, value)); field = ""; value = ""; lastWasValue = false }
        return append(&field, at, n)
    }

    private func headerValue(_ at: UnsafePointer<CChar>?, _ n: Int) -> Int32 {
        lastWasValue = true
        return append(&value, at, n)
    }

    private func headersComplete() -> Int32 {
        inHeaders = false
        if lastWasValue || !field.isEmpty { current.headers.append((field, value)) }
        current.method = String(cString: http_method_str(http_method(rawValue: UInt32(parser.pointee.method))))
        current.keepAlive = http_should_keep_alive(parser) != 0
        if parser.pointee.content_length != UInt64.max, parser.pointee.content_length > UInt64(maxBodyBytes) {
            return fail(.bodyTooLarge(limit: maxBodyBytes))
        }
        if let e = current.header("Expect"), e.caseInsensitiveCompare("100-continue") == .orderedSame {
            expectsContinue = true
        }
        return 0
    }

    private func body(_ at: UnsafePointer<CChar>?, _ n: Int) -> Int32 {
        expectsContinue = false
        if current.body.count + n > maxBodyBytes { return fail(.bodyTooLarge(limit: maxBodyBytes)) }
        current.body.append(UnsafeRawPointer(at!).assumingMemoryBound(to: UInt8.self), count: n)
        return 0
    }

    private func messageComplete() -> Int32 {
        expectsContinue = false
        current.keepAlive = http_should_keep_alive(parser) != 0
        completed.append(current)
        current = HTTPRequest(method: "", target: "", headers: [], body: Data(), keepAlive: true)
        headerBytes = 0
        return 0
    }
}
