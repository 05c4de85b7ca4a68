// `GET /v1/weights/manifest` and `GET /v1/weights` (protocol: docs/protocol.md, "Weight
// publishing"). The manifest names every tensor's byte range in the body and its SHA-256; the
// body is the safetensors file of one publication, served from memory without a copy, with
// `Range`, `If-Range` and `If-Match` against its ETag (the weights version; an adapter's is its
// SHA-256). `?after=V` and `?changed=ID` make the manifest a long poll.
import Foundation
import Logging
import RPC
import Weights

struct WeightRoutes: Sendable {
    let publisher: WeightPublisher
    let logger: Logger

    static let defaultPollSeconds = 30.0, maxPollSeconds = 300.0

    static func error(_ status: Int, _ message: String, path: String? = nil, hint: String? = nil) -> HTTPResponse {
        var body: [String: Any] = ["error": message]
        if let path { body["path"] = path }
        if let hint { body["hint"] = hint }
        return HTTPResponse(status: status, body: (try? JSONSerialization.data(withJSONObject: body, options: [.sortedKeys])) ?? Data())
    }

    /// The query string's parameters (percent-decoded; later duplicates win).
    static func query(_ target: String) -> [String: String] {
        guard let q = target.split(separator: "?", maxSplits: 1).dropFirst().first else { return [:] }
        var out: [String: String] = [:]
        for pair in q.split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let k = String(kv[0]).replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? String(kv[0])
            let v = kv.count > 1 ? (String(kv[1]).replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? String(kv[1])) : ""
            out[k] = v
        }
        return out
    }

    func manifest(_ request: HTTPRequest, _ responder: HTTPResponder) {
        let q = Self.query(request.target)
        if let unknown = q.keys.sorted().first(where: { !["after", "changed", "timeout"].contains($0) }) {
            responder.respond(Self.error(400, "unknown query parameter '\(unknown)'", path: "query.\(unknown)",
                                         hint: "the manifest takes after=VERSION, changed=MANIFEST_ID and timeout=SECONDS"))
            return
        }
        var after: Int?
        if let s = q["after"] {
            guard let v = Int(s) else {
                responder.respond(Self.error(400, "after must be an integer weights version", path: "query.after", hint: "for example ?after=12"))
                return
            }
            after = v
        }
        let changed = q["changed"]
        var timeout = Self.defaultPollSeconds
        if let s = q["timeout"] {
            guard let t = Double(s), t >= 0, t <= Self.maxPollSeconds else {
                responder.respond(Self.error(400, "timeout must be a number of seconds in 0...\(Int(Self.maxPollSeconds))", path: "query.timeout"))
                return
            }
            timeout = t
        }
        if after == nil && changed == nil { timeout = 0 }
        let since = after
        publisher.manifest(timeout: timeout, satisfied: { p in
            (since.map { p.weights.weightsVersion != $0 } ?? false) || (changed.map { p.id != $0 } ?? false) || (since == nil && changed == nil)
        }) { result in
            switch result {
            case let .failure(e):
                responder.respond(Self.error(500, "cannot publish the weights: \(e)"))
            case .success(nil):
                responder.respond(HTTPResponse(status: 304, headers: [("Cache-Control", "no-store")]))
            case let .success(p?):
                responder.respond(HTTPResponse(status: 200, body: p.manifest, headers: [("ETag", p.etag), ("Cache-Control", "no-store")]))
            }
        }
    }

    func weights(_ request: HTTPRequest, _ responder: HTTPResponder) {
        let q = Self.query(request.target)
        if let unknown = q.keys.sorted().first(where: { $0 != "adapter" }) {
            responder.respond(Self.error(400, "unknown query parameter '\(unknown)'", path: "query.\(unknown)",
                                         hint: "GET /v1/weights takes adapter=NAME (or nothing, for the base weights)"))
            return
        }
        let adapter = q["adapter"]
        let ifMatch = request.header("If-Match")?.trimmingCharacters(in: .whitespaces)
        // A named older version still held by a download in flight is served as it was.
        if let tag = ifMatch, adapter == nil, tag != "*", let p = publisher.publication(etag: tag) {
            serve(p, adapter: nil, request, responder)
            return
        }
        publisher.latest { result in
            switch result {
            case let .failure(e): responder.respond(Self.error(500, "cannot publish the weights: \(e)"))
            case let .success(p): serve(p, adapter: adapter, request, responder)
            }
        }
    }

    private func serve(_ p: Publication, adapter: String?, _ request: HTTPRequest, _ responder: HTTPResponder) {
        let image: SafetensorsImageView
        let etag: String
        if let name = adapter {
            guard let i = p.weights.adapters.firstIndex(where: { $0.name == name }) else {
                let names = p.weights.adapters.map(\.name)
                responder.respond(Self.error(404, "no adapter named '\(name)'", path: "query.adapter",
                                             hint: names.isEmpty ? "this server holds no adapters" : "the manifest lists \(names.prefix(8).joined(separator: ", "))"))
                return
            }
            image = SafetensorsImageView(p.weights.adapters[i].image)
            etag = "\"\(p.adapterHashes[i])\""
        } else {
            image = SafetensorsImageView(p.weights.image)
            etag = p.etag
        }
        var headers: [(String, String)] = [("ETag", etag), ("Accept-Ranges", "bytes"), ("Cache-Control", "no-store")]
        if let tag = request.header("If-Match")?.trimmingCharacters(in: .whitespaces), tag != "*",
           !tag.split(separator: ",").contains(where: { $0.trimmingCharacters(in: .whitespaces) == etag }) {
            responder.respond(Self.error(412, "the weights are at \(etag) now, not \(tag)", path: "header.If-Match",
                                         hint: "read the manifest again and download that version"))
            return
        }
        var lo = 0, hi = image.count
        var status = 200
        let honourRange = request.header("If-Range").map { $0.trimmingCharacters(in: .whitespaces) == etag } ?? true
        if let range = request.header("Range"), honourRange {
            switch Self.parseRange(range, size: image.count) {
            case .ignore: break
            case .unsatisfiable:
                headers.append(("Content-Range", "bytes */\(image.count)"))
                var r = Self.error(416, "range \(range) lies outside the \(image.count)-byte body", path: "header.Range")
                r.headers += headers
                responder.respond(r)
                return
            case let .range(a, b):
                lo = a; hi = b
                status = 206
                headers.append(("Content-Range", "bytes \(a)-\(b - 1)/\(image.count)"))
            }
        }
        publisher.served(hi - lo)
        let payload = SharedBytes(base: UnsafeRawPointer(image.bytes) + lo, count: hi - lo, owner: p)
        responder.respond(HTTPResponse(status: status, contentType: "application/octet-stream", headers: headers, payload: payload))
    }

    enum RangeRequest: Equatable { case ignore, unsatisfiable, range(Int, Int) }

    /// One `bytes=` range (first-last, first-, or -suffix) as [lo, hi); several ranges, another
    /// unit or a malformed header are ignored (the whole body is sent), as RFC 9110 allows.
    static func parseRange(_ header: String, size: Int) -> RangeRequest {
        let h = header.trimmingCharacters(in: .whitespaces)
        guard h.hasPrefix("bytes="), !h.contains(",") else { return .ignore }
        let spec = h.dropFirst(6).trimmingCharacters(in: .whitespaces)
        let parts = spec.split(separator: "-", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2 else { return .ignore }
        let first = parts[0].trimmingCharacters(in: .whitespaces), last = parts[1].trimmingCharacters(in: .whitespaces)
        if first.isEmpty {
            guard let n = Int(last), n >= 0 else { return .ignore }
            guard n > 0, size > 0 else { return .unsatisfiable }
            return .range(max(0, size - n), size)
        }
        guard let a = Int(first), a >= 0 else { return .ignore }
        var b = size - 1
        if !last.isEmpty {
            guard let l = Int(last), l >= a else { return .ignore }
            b = min(l, size - 1)
        }
        guard a < size else { return .unsatisfiable }
        return .range(a, b + 1)
    }
}

/// The bytes of an image (the publication keeps the image alive).
struct SafetensorsImageView {
    let bytes: UnsafeMutableRawPointer
    let count: Int
    init(_ image: SafetensorsImage) { bytes = image.bytes; count = image.count }
}
