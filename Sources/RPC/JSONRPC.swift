// JSON-RPC 2.0 (https://www.jsonrpc.org/specification): request and batch decoding, the error
// model (standard codes plus domain errors with a stable `data.kind` and `data.path`), and
// responses that echo the request id exactly. Transport-free: the server feeds it request bodies.
import Chat
import Foundation
import JSON

/// A request id: string, number (kept as its JSON text so 7 and 7.0 echo as sent) or null.
public enum RequestID: Sendable, Equatable, Hashable {
    case string(String)
    case number(String)
    case null

    var json: Any {
        switch self {
        case let .string(s): s
        case let .number(text): RawJSON(text)
        case .null: NSNull()
        }
    }
}

/// A decoded JSON value handed between threads.
/// Sendable by hand: JSONSerialization's trees are immutable once built.
public struct JSONValue: @unchecked Sendable {
    public let value: Any?
    public init(_ value: Any?) { self.value = value }
}

/// One decoded call.
/// Sendable by hand: `params` is an immutable JSONSerialization tree.
public struct RPCRequest: @unchecked Sendable {
    public let method: String
    /// `params` as sent: an object, an array, or absent (nil).
    public let params: Any?
    /// nil for a notification (no response is sent).
    public let id: RequestID?
    public var isNotification: Bool { id == nil }
}

/// What a body decodes to: one call, a batch of calls (each possibly invalid), or an error that
/// prevents reading any call.
public enum RPCEnvelope {
    case single(Result<RPCRequest, RPCError>, id: RequestID?)
    case batch([(Result<RPCRequest, RPCError>, RequestID?)])
    case failure(RPCError)
}

/// A parameter read with its objects' key order kept (`messages`, `tools`): what chat templates
/// render must not depend on how a dictionary hashes.
public final class OrderedParams: @unchecked Sendable {
    static let keys = ["messages", "tools", "template_kwargs"]
    public let value: JValue
    public init(_ value: JValue) { self.value = value }
}

public enum JSONRPC {
    /// Deepest nesting accepted (arrays and objects); deeper bodies are refused before parsing.
    public static let maxDepth = 64
    /// Most calls in one batch.
    public static let maxBatch = 256

    /// Decodes a request body.
    public static func decode(_ body: Data) -> RPCEnvelope {
        let value: Any
        do { value = try FastJSON.parse(body, maxDepth: maxDepth) } catch let f as FastJSON.Failure {
            return .failure(.parse(f.message.hasPrefix("nesting") ? f.message : "the body is not valid JSON: \(f)"))
        } catch {
            return .failure(.parse("the body is not valid JSON"))
        }
        // Conversations and tool schemas keep their key order (templates print them with tojson,
        // as Python would in the order the client sent): those params are read again, ordered.
        var ordered: JValue?
        func orderedParams(_ item: Any, index: Int?) -> Any {
            guard var obj = item as? [String: Any], var params = obj["params"] as? [String: Any],
                  OrderedParams.keys.contains(where: { params[$0] != nil }) else { return item }
            if ordered == nil { ordered = try? JValue.parseJSON(body) }
            var call = ordered
            if let index, case let .array(items)? = ordered { call = index < items.count ? items[index] : nil }
            guard case let .dict(c)? = call, case let .dict(p)? = c["params"] else { return item }
            for key in OrderedParams.keys { if let v = p[key] { params[key] = OrderedParams(v) } }
            obj["params"] = params
            return obj
        }
        if let list = value as? [Any] {
            if list.isEmpty { return .failure(.invalidRequest("an empty batch")) }
            if list.count > maxBatch {
                return .failure(.invalidRequest("a batch of \(list.count) calls exceeds the limit of \(maxBatch)"))
            }
            return .batch(list.enumerated().map { i, item in
                let id = requestID(item)
                return (call(orderedParams(item, index: i)), id)
            })
        }
        return .single(call(orderedParams(value, index: nil)), id: requestID(value))
    }

    /// The id of a request object, when it has a valid one (used to address error responses).
    static func requestID(_ value: Any) -> RequestID? {
        guard let obj = value as? [String: Any], let raw = obj["id"] else { return nil }
        return parseID(raw)
    }

    public static func parseID(_ raw: Any) -> RequestID? {
        if isJSONNull(raw) { return .null }
        if let s = raw as? String { return .string(s) }
        switch JSONNumber.classify(raw) {
        case let .int(i)?: return .number("\(i)")
        case let .double(d)?: return .number("\(d)")
        default: return nil
        }
    }

    static func call(_ value: Any) -> Result<RPCRequest, RPCError> {
        guard let obj = value as? [String: Any] else { return .failure(.invalidRequest("a call must be a JSON object")) }
        guard obj["jsonrpc"] as? String == "2.0" else { return .failure(.invalidRequest("\"jsonrpc\" must be \"2.0\"")) }
        guard let method = obj["method"] as? String else { return .failure(.invalidRequest("\"method\" must be a string")) }
        var id: RequestID?
        if let raw = obj["id"] {
            guard let parsed = parseID(raw) else {
                return .failure(.invalidRequest("\"id\" must be a string, a number or null"))
            }
            id = parsed
        }
        let params = obj["params"]
        if let p = params, !(p is [String: Any]) && !(p is [Any]) {
            return .failure(.invalidRequest("\"params\" must be an object or an array"))
        }
        return .success(RPCRequest(method: method, params: params, id: id))
    }

    // MARK: - Responses

    /// A success response object.
    public static func response(id: RequestID, result: Any) -> [String: Any] {
        ["jsonrpc": "2.0", "id": id.json, "result": result]
    }

    /// An error response object (id null when the request's id could not be read).
    public static func response(id: RequestID?, error: RPCError) -> [String: Any] {
        ["jsonrpc": "2.0", "id": (id ?? .null).json, "error": error.json]
    }

    /// Serializes a response (or a batch of them); numbers given as `RawJSON` are written verbatim.
    public static func encode(_ value: Any) -> Data {
        var out: [UInt8] = []
        out.reserveCapacity(256)
        write(value, to: &out)
        return Data(out)
    }

    static func write(_ value: Any, to out: inout [UInt8]) {
        // Exact types first: a cast like `[Any] as? [Float]` converts element by element.
        let t = type(of: value)
        if t == [Any].self {
            out.append(UInt8(ascii: "["))
            for (i, v) in (value as! [Any]).enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                write(v, to: &out)
            }
            out.append(UInt8(ascii: "]"))
            return
        }
        if t == [Double].self {
            out.append(UInt8(ascii: "["))
            for (i, d) in (value as! [Double]).enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                out.append(contentsOf: (d.isFinite ? "\(d)" : "null").utf8)
            }
            out.append(UInt8(ascii: "]"))
            return
        }
        if t == NSNull.self { out.append(contentsOf: "null".utf8); return }
        switch value {
        case let s as String: writeString(s, to: &out)
        case let fs as [Float]:
            out.append(UInt8(ascii: "["))
            for (i, f) in fs.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                out.append(contentsOf: (f.isFinite ? "\(f)" : "null").utf8)
            }
            out.append(UInt8(ascii: "]"))
        case let ints as [Int]:
            out.append(UInt8(ascii: "["))
            for (i, n) in ints.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                out.append(contentsOf: String(n).utf8)
            }
            out.append(UInt8(ascii: "]"))
        case let raw as RawJSON: out.append(contentsOf: raw.text.utf8)
        case let dict as [String: Any]:
            out.append(UInt8(ascii: "{"))
            for (i, key) in dict.keys.sorted().enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                write(key, to: &out)
                out.append(UInt8(ascii: ":"))
                write(dict[key]!, to: &out)
            }
            out.append(UInt8(ascii: "}"))
        case let list as [Any]:
            out.append(UInt8(ascii: "["))
            for (i, v) in list.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                write(v, to: &out)
            }
            out.append(UInt8(ascii: "]"))
        case let f as Float:
            // Shortest text that reads back as the same Float; non-finite values become null.
            out.append(contentsOf: (f.isFinite ? "\(f)" : "null").utf8)
        case let d as Double:
            out.append(contentsOf: (d.isFinite ? "\(d)" : "null").utf8)
        case let i as Int:
            out.append(contentsOf: "\(i)".utf8)
        case let b as Bool:
            out.append(contentsOf: (b ? "true" : "false").utf8)
        default:
            // Anything else through Foundation.
            if let data = try? JSONSerialization.data(withJSONObject: value, options: [.fragmentsAllowed, .withoutEscapingSlashes]) {
                out.append(contentsOf: data)
            } else {
                out.append(contentsOf: "null".utf8)
            }
        }
    }
}

extension JSONRPC {
    /// A JSON string: quotes, backslashes and control characters escaped, other UTF-8 as is.
    static func writeString(_ s: String, to out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        let hex = Array("0123456789abcdef".utf8)
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "\""): out.append(contentsOf: [92, 34])
            case UInt8(ascii: "\\"): out.append(contentsOf: [92, 92])
            case 10: out.append(contentsOf: [92, UInt8(ascii: "n")])
            case 13: out.append(contentsOf: [92, UInt8(ascii: "r")])
            case 9: out.append(contentsOf: [92, UInt8(ascii: "t")])
            case 0..<32: out.append(contentsOf: [92, UInt8(ascii: "u"), 48, 48, hex[Int(b >> 4)], hex[Int(b & 15)]])
            default: out.append(b)
            }
        }
        out.append(UInt8(ascii: "\""))
    }
}

/// A JSON fragment written as is (ids echo their original number text).
public struct RawJSON: Sendable {
    public let text: String
    public init(_ text: String) { self.text = text }
}
