// Values of the Jinja interpreter, with Python's semantics where chat templates rely on them:
// truthiness, equality (1 == 1.0 == True), str() and repr() of None, booleans, floats, lists and
// dicts, and json.dumps as Hugging Face's `tojson` filter calls it. Dicts keep insertion order.
import Foundation
import JSON

/// A mutable attribute bag (`namespace(...)`): shared by reference, as in Jinja.
public final class JNamespace {
    var values: JDict
    init(_ values: JDict) { self.values = values }
}

/// A callable: a global, a macro, a filter-like method bound to its receiver.
public final class JFunction {
    let name: String
    let body: (_ args: [JValue], _ kwargs: [(String, JValue)]) throws -> JValue
    init(_ name: String, _ body: @escaping (_ args: [JValue], _ kwargs: [(String, JValue)]) throws -> JValue) {
        self.name = name; self.body = body
    }
}

/// An insertion-ordered string-keyed dictionary (Python dicts keep order; tojson shows it).
public struct JDict {
    public private(set) var keys: [String] = []
    private var map: [String: JValue] = [:]
    public init() {}
    public init(_ pairs: [(String, JValue)]) { for (k, v) in pairs { self[k] = v } }
    public subscript(key: String) -> JValue? {
        get { map[key] }
        set {
            if let v = newValue {
                if map[key] == nil { keys.append(key) }
                map[key] = v
            } else if map[key] != nil {
                map[key] = nil
                keys.removeAll { $0 == key }
            }
        }
    }
    public var count: Int { keys.count }
    public var pairs: [(String, JValue)] { keys.map { ($0, map[$0]!) } }
}

public indirect enum JValue {
    /// A missing variable or key; the name is kept for error messages.
    case undefined(String)
    case none
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case array([JValue])
    case dict(JDict)
    case namespace(JNamespace)
    case function(JFunction)

    public var isUndefined: Bool { if case .undefined = self { return true }; return false }

    /// Python truthiness.
    public var truthy: Bool {
        switch self {
        case .undefined, .none: return false
        case let .bool(b): return b
        case let .int(i): return i != 0
        case let .double(d): return d != 0
        case let .string(s): return !s.isEmpty
        case let .array(a): return !a.isEmpty
        case let .dict(d): return d.count > 0
        case .namespace, .function: return true
        }
    }

    /// A number as Double (bools count as 0/1, as in Python).
    var number: Double? {
        switch self {
        case let .int(i): return Double(i)
        case let .double(d): return d
        case let .bool(b): return b ? 1 : 0
        default: return nil
        }
    }

    var typeName: String {
        switch self {
        case .undefined: return "undefined"
        case .none: return "NoneType"
        case .bool: return "bool"
        case .int: return "int"
        case .double: return "float"
        case .string: return "str"
        case .array: return "list"
        case .dict: return "dict"
        case .namespace: return "Namespace"
        case .function: return "function"
        }
    }

    /// Python's `==`.
    static func equal(_ a: JValue, _ b: JValue) -> Bool {
        switch (a, b) {
        case (.undefined, .undefined), (.none, .none): return true
        case let (.string(x), .string(y)): return x == y
        case let (.array(x), .array(y)): return x.count == y.count && zip(x, y).allSatisfy { equal($0, $1) }
        case let (.dict(x), .dict(y)):
            return x.count == y.count && x.pairs.allSatisfy { k, v in y[k].map { equal(v, $0) } ?? false }
        case let (.namespace(x), .namespace(y)): return x === y
        case let (.function(x), .function(y)): return x === y
        default:
            if let x = a.number, let y = b.number { return x == y }
            return false
        }
    }

    /// Python's str().
    public var str: String {
        switch self {
        case .undefined: return ""
        case let .string(s): return s
        default: return repr
        }
    }

    /// Python's repr() (how a list or dict prints in a template).
    var repr: String {
        switch self {
        case .undefined: return ""
        case .none: return "None"
        case let .bool(b): return b ? "True" : "False"
        case let .int(i): return String(i)
        case let .double(d): return pythonFloat(d)
        case let .string(s): return pythonStringRepr(s)
        case let .array(a): return "[" + a.map(\.repr).joined(separator: ", ") + "]"
        case let .dict(d): return "{" + d.pairs.map { pythonStringRepr($0.0) + ": " + $0.1.repr }.joined(separator: ", ") + "}"
        case .namespace: return "<Namespace>"
        case let .function(f): return "<function \(f.name)>"
        }
    }
}

/// Python's repr of a float: shortest round-trip digits, "1.0" for integral values, exponent
/// form outside [1e-4, 1e16).
func pythonFloat(_ d: Double) -> String {
    if d.isNaN { return "NaN" }
    if d.isInfinite { return d > 0 ? "Infinity" : "-Infinity" }
    if d == d.rounded(), abs(d) < 1e16 {
        return String(format: "%.1f", d) == "-0.0" ? "-0.0" : String(Int64(d)) + ".0"
    }
    var s = "\(d)"   // Swift: shortest round-trip, e.g. 1e-05, 1.5e+20, 0.1
    if let e = s.firstIndex(where: { $0 == "e" || $0 == "E" }) {
        // Python writes the exponent with a sign and at least two digits: 1e-05, 1.5e+20.
        let mantissa = String(s[..<e]), exp = String(s[s.index(after: e)...])
        let sign = exp.hasPrefix("-") ? "-" : "+"
        let digits = exp.trimmingCharacters(in: CharacterSet(charactersIn: "+-"))
        s = mantissa + "e" + sign + (digits.count < 2 ? "0" + digits : digits)
    }
    return s
}

func pythonStringRepr(_ s: String) -> String {
    let quote: Character = s.contains("'") && !s.contains("\"") ? "\"" : "'"
    var out = String(quote)
    for ch in s.unicodeScalars {
        switch ch {
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        default:
            if Character(ch) == quote { out += "\\" + String(quote) }
            else if ch.value < 0x20 || ch.value == 0x7f { out += String(format: "\\x%02x", ch.value) }
            else { out.unicodeScalars.append(ch) }
        }
    }
    return out + String(quote)
}

/// json.dumps(value, ensure_ascii=False, indent=indent, separators=..., sort_keys=sortKeys).
func jsonDumps(_ v: JValue, indent: Int?, itemSeparator: String? = nil, keySeparator: String? = nil,
               sortKeys: Bool = false, ensureASCII: Bool = false, depth: Int = 0) throws -> String {
    let item = itemSeparator ?? (indent == nil ? ", " : ","), key = keySeparator ?? ": "
    func str(_ s: String) -> String {
        var out = "\""
        for ch in s.unicodeScalars {
            switch ch {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            default:
                if ch.value < 0x20 || (ensureASCII && ch.value > 0x7e) {
                    if ch.value > 0xFFFF {
                        let v = ch.value - 0x10000
                        out += String(format: "\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF))
                    } else {
                        out += String(format: "\\u%04x", ch.value)
                    }
                } else {
                    out.unicodeScalars.append(ch)
                }
            }
        }
        return out + "\""
    }
    let pad = indent.map { "\n" + String(repeating: " ", count: $0 * (depth + 1)) } ?? ""
    let close = indent.map { "\n" + String(repeating: " ", count: $0 * depth) } ?? ""
    switch v {
    case .none, .undefined: return "null"
    case let .bool(b): return b ? "true" : "false"
    case let .int(i): return String(i)
    case let .double(d): return pythonFloat(d)
    case let .string(s): return str(s)
    case let .array(a):
        if a.isEmpty { return "[]" }
        let parts = try a.map { try jsonDumps($0, indent: indent, itemSeparator: itemSeparator, keySeparator: keySeparator,
                                              sortKeys: sortKeys, ensureASCII: ensureASCII, depth: depth + 1) }
        return "[" + pad + parts.joined(separator: item + pad) + close + "]"
    case let .dict(d):
        if d.count == 0 { return "{}" }
        var pairs = d.pairs
        if sortKeys { pairs.sort { $0.0.unicodeScalars.lexicographicallyPrecedes($1.0.unicodeScalars) } }
        let parts = try pairs.map { k, v in
            str(k) + key + (try jsonDumps(v, indent: indent, itemSeparator: itemSeparator, keySeparator: keySeparator,
                                          sortKeys: sortKeys, ensureASCII: ensureASCII, depth: depth + 1))
        }
        return "{" + pad + parts.joined(separator: item + pad) + close + "}"
    case let .namespace(n): return try jsonDumps(.dict(n.values), indent: indent, itemSeparator: itemSeparator,
                                                 keySeparator: keySeparator, sortKeys: sortKeys, ensureASCII: ensureASCII, depth: depth)
    case .function: throw TemplateError(line: 0, message: "Object of type function is not JSON serializable")
    }
}

extension JValue {
    /// A JSON value (either reader's: FastJSON or JSONSerialization) as a template value: integers stay integers.
    public static func fromJSON(_ any: Any?) -> JValue {
        switch any {
        case nil: return .none
        case let v? where isJSONNull(v): return .none
        case let s as String: return .string(s)
        case let a as [Any]: return .array(a.map { fromJSON($0) })
        case let d as [String: Any]:
            // A dictionary has no key order; callers that care pass JValue.parseJSON's values instead.
            return .dict(JDict(d.keys.sorted().map { ($0, fromJSON(d[$0])) }))
        case let v as JValue: return v
        case let v? where JSONNumber.isBool(v): return .bool(v as? Bool ?? (v as! NSNumber).boolValue)
        case let v?:
            switch JSONNumber.classify(v) {
            case let .int(i)?: return .int(i)
            case let .double(d)?: return .double(d)
            case nil: return .string("\(v)")
            }
        }
    }
}

extension JValue {
    /// json.dumps(self) with Python's default separators (what `| tojson` prints).
    public var jsonText: String { (try? jsonDumps(self, indent: nil)) ?? "null" }
}
