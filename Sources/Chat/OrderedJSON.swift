// JSON text to template values, keeping object key order (tool schemas are printed with
// `tojson`, and Python keeps the order the client sent). Integers stay integers.
import Foundation

extension JValue {
    public static func parseJSON(_ data: Data) throws -> JValue {
        var p = OrderedJSONParser(bytes: [UInt8](data))
        p.skip()
        let v = try p.value(depth: 0)
        p.skip()
        guard p.i == p.bytes.count else { throw p.error("trailing characters") }
        return v
    }
}

struct OrderedJSONParser {
    let bytes: [UInt8]
    var i = 0
    init(bytes: [UInt8]) { self.bytes = bytes }

    func error(_ m: String) -> TemplateError { TemplateError(line: 0, message: "JSON at byte \(i): \(m)") }
    mutating func skip() { while i < bytes.count, [0x20, 0x09, 0x0A, 0x0D].contains(bytes[i]) { i += 1 } }

    mutating func value(depth: Int) throws -> JValue {
        guard depth < 512 else { throw error("nested too deeply") }
        guard i < bytes.count else { throw error("unexpected end") }
        switch bytes[i] {
        case UInt8(ascii: "{"):
            i += 1; skip()
            var d = JDict()
            if i < bytes.count && bytes[i] == UInt8(ascii: "}") { i += 1; return .dict(d) }
            while true {
                skip()
                guard case let .string(k) = try value(depth: depth + 1) else { throw error("object keys are strings") }
                skip()
                guard i < bytes.count, bytes[i] == UInt8(ascii: ":") else { throw error("expected ':'") }
                i += 1; skip()
                d[k] = try value(depth: depth + 1)
                skip()
                guard i < bytes.count else { throw error("unexpected end") }
                if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
                if bytes[i] == UInt8(ascii: "}") { i += 1; return .dict(d) }
                throw error("expected ',' or '}'")
            }
        case UInt8(ascii: "["):
            i += 1; skip()
            var a: [JValue] = []
            if i < bytes.count && bytes[i] == UInt8(ascii: "]") { i += 1; return .array(a) }
            while true {
                skip()
                a.append(try value(depth: depth + 1))
                skip()
                guard i < bytes.count else { throw error("unexpected end") }
                if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
                if bytes[i] == UInt8(ascii: "]") { i += 1; return .array(a) }
                throw error("expected ',' or ']'")
            }
        case UInt8(ascii: "\""):
            i += 1
            var out = [UInt8]()
            while i < bytes.count && bytes[i] != UInt8(ascii: "\"") {
                if bytes[i] == UInt8(ascii: "\\") {
                    guard i + 1 < bytes.count else { throw error("bad escape") }
                    let e = bytes[i + 1]; i += 2
                    switch e {
                    case UInt8(ascii: "n"): out.append(0x0A)
                    case UInt8(ascii: "t"): out.append(0x09)
                    case UInt8(ascii: "r"): out.append(0x0D)
                    case UInt8(ascii: "b"): out.append(0x08)
                    case UInt8(ascii: "f"): out.append(0x0C)
                    case UInt8(ascii: "u"):
                        func hex() throws -> UInt32 {
                            guard i + 4 <= bytes.count, let v = UInt32(String(decoding: bytes[i..<(i + 4)], as: UTF8.self), radix: 16) else { throw error("bad \\u escape") }
                            i += 4; return v
                        }
                        var code = try hex()
                        if code >= 0xD800 && code < 0xDC00, i + 1 < bytes.count, bytes[i] == UInt8(ascii: "\\"), bytes[i + 1] == UInt8(ascii: "u") {
                            i += 2
                            let low = try hex()
                            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                        }
                        out += Array(String(Unicode.Scalar(code).map(Character.init) ?? "\u{FFFD}").utf8)
                    default: out.append(e)
                    }
                } else { out.append(bytes[i]); i += 1 }
            }
            guard i < bytes.count else { throw error("unterminated string") }
            i += 1
            return .string(String(decoding: out, as: UTF8.self))
        case UInt8(ascii: "t"): return try literal("true", .bool(true))
        case UInt8(ascii: "f"): return try literal("false", .bool(false))
        case UInt8(ascii: "n"): return try literal("null", .none)
        default:
            let start = i
            var isFloat = false
            while i < bytes.count, let c = Optional(bytes[i]), (c >= 0x30 && c <= 0x39) || c == UInt8(ascii: "-") || c == UInt8(ascii: "+")
                    || c == UInt8(ascii: ".") || c == UInt8(ascii: "e") || c == UInt8(ascii: "E") {
                if c == UInt8(ascii: ".") || c == UInt8(ascii: "e") || c == UInt8(ascii: "E") { isFloat = true }
                i += 1
            }
            let text = String(decoding: bytes[start..<i], as: UTF8.self)
            if !isFloat, let v = Int(text) { return .int(v) }
            guard let d = Double(text) else { throw error("bad value") }
            return .double(d)
        }
    }

    mutating func literal(_ word: String, _ v: JValue) throws -> JValue {
        let w = Array(word.utf8)
        guard i + w.count <= bytes.count, Array(bytes[i..<(i + w.count)]) == w else { throw error("bad literal") }
        i += w.count
        return v
    }
}
