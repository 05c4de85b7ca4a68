// Typed access to `params` with errors that name the parameter (`params.loss.rho: expected a
// number`). Every accessor either returns a valid value, the documented default, or throws an
// `RPCError.invalidParams` with the path.
import Foundation
import JSON

public struct Params {
    public let object: [String: Any]
    public let path: String

    public init(_ value: Any?, path: String = "params") throws {
        if let o = value as? [String: Any] { object = o }
        else if value == nil || isJSONNull(value!) { object = [:] }
        else { throw RPCError.invalidParams(path: path, "expected an object with named parameters") }
        self.path = path
    }

    func sub(_ key: String) -> String { "\(path).\(key)" }

    public func has(_ key: String) -> Bool {
        guard let v = object[key] else { return false }
        return !isJSONNull(v)
    }

    /// Refuses keys outside `allowed` (a typo must not silently fall back to a default).
    public func only(_ allowed: Set<String>) throws {
        for k in object.keys where !allowed.contains(k) {
            throw RPCError.invalidParams(path: sub(k), "unknown parameter; accepted: \(allowed.sorted().joined(separator: ", "))")
        }
    }

    static func isBool(_ v: Any) -> Bool { JSONNumber.isBool(v) }

    public func int(_ key: String, _ fallback: Int? = nil, min: Int? = nil, max: Int? = nil) throws -> Int {
        guard has(key) else {
            if let f = fallback { return f }
            throw RPCError.invalidParams(path: sub(key), "required")
        }
        return try Self.integer(object[key]!, path: sub(key), min: min, max: max)
    }

    static func integer(_ v: Any, path: String, min: Int? = nil, max: Int? = nil) throws -> Int {
        guard let i = JSONNumber.classify(v)?.exactInt else { throw RPCError.invalidParams(path: path, "expected an integer") }
        if let lo = min, i < lo { throw RPCError.invalidParams(path: path, "must be >= \(lo), got \(i)") }
        if let hi = max, i > hi { throw RPCError.invalidParams(path: path, "must be <= \(hi), got \(i)") }
        return i
    }

    public func float(_ key: String, _ fallback: Float? = nil, min: Float? = nil, max: Float? = nil) throws -> Float {
        guard has(key) else {
            if let f = fallback { return f }
            throw RPCError.invalidParams(path: sub(key), "required")
        }
        guard let d = JSONNumber.classify(object[key]!)?.double, d.isFinite, abs(d) <= Double(Float.greatestFiniteMagnitude) else {
            throw RPCError.invalidParams(path: sub(key), "expected a finite number")
        }
        let f = Float(d)
        if let lo = min, f < lo { throw RPCError.invalidParams(path: sub(key), "must be >= \(lo), got \(f)") }
        if let hi = max, f > hi { throw RPCError.invalidParams(path: sub(key), "must be <= \(hi), got \(f)") }
        return f
    }

    public func bool(_ key: String, _ fallback: Bool) throws -> Bool {
        guard has(key) else { return fallback }
        guard Self.isBool(object[key]!), let b = object[key] as? Bool ?? (object[key] as? NSNumber)?.boolValue else {
            throw RPCError.invalidParams(path: sub(key), "expected true or false")
        }
        return b
    }

    public func string(_ key: String, _ fallback: String? = nil, oneOf: [String]? = nil) throws -> String {
        guard has(key) else {
            if let f = fallback { return f }
            throw RPCError.invalidParams(path: sub(key), "required")
        }
        guard let s = object[key] as? String else { throw RPCError.invalidParams(path: sub(key), "expected a string") }
        if let allowed = oneOf, !allowed.contains(s) {
            throw RPCError.invalidParams(path: sub(key), "must be one of \(allowed.joined(separator: ", ")), got '\(s)'")
        }
        return s
    }

    public func strings(_ key: String) throws -> [String] {
        guard let list = object[key] as? [Any] else { throw RPCError.invalidParams(path: sub(key), "expected an array of strings") }
        return try list.enumerated().map { i, v in
            guard let s = v as? String else { throw RPCError.invalidParams(path: "\(sub(key))[\(i)]", "expected a string") }
            return s
        }
    }

    /// An array of token ids (Int32 range).
    public func tokens(_ key: String) throws -> [Int32] {
        try Self.tokenList(object[key], path: sub(key))
    }

    static func tokenList(_ v: Any?, path: String) throws -> [Int32] {
        if let v, type(of: v) == [Int].self {
            let ints = v as! [Int]
            var out = [Int32](repeating: 0, count: ints.count)
            for (i, t) in ints.enumerated() {
                guard t >= 0 && t <= Int(Int32.max) else {
                    throw RPCError.invalidParams(path: "\(path)[\(i)]", t < 0 ? "must be >= 0, got \(t)" : "must be <= \(Int32.max), got \(t)")
                }
                out[i] = Int32(t)
            }
            return out
        }
        guard let list = v as? [Any] else { throw RPCError.invalidParams(path: path, "expected an array of token ids") }
        return try list.enumerated().map { i, t in
            Int32(try integer(t, path: "\(path)[\(i)]", min: 0, max: Int(Int32.max)))
        }
    }

    public func tokenLists(_ key: String) throws -> [[Int32]] {
        guard let list = object[key] as? [Any] else { throw RPCError.invalidParams(path: sub(key), "expected an array of token arrays") }
        return try list.enumerated().map { i, v in try Self.tokenList(v, path: "\(sub(key))[\(i)]") }
    }

    /// As `floats`, with null read as `null` (proxy log-probabilities: null, as the server writes
    /// it, is a token the proxy dropped, −infinity).
    public func floats(_ key: String, null: Float) throws -> [Float] {
        guard let list = object[key] as? [Any], list.contains(where: { $0 is NSNull }) else { return try floats(key) }
        return try list.enumerated().map { i, v in
            if v is NSNull { return null }
            guard let d = JSONNumber.classify(v)?.double, d.isFinite else {
                throw RPCError.invalidParams(path: "\(sub(key))[\(i)]", "expected a finite number or null")
            }
            return Float(d)
        }
    }

    public func floats(_ key: String) throws -> [Float] {
        if let v = object[key], type(of: v) == [Double].self || type(of: v) == [Int].self {
            let values = (v as? [Double]) ?? (v as! [Int]).map(Double.init)
            var out = [Float](repeating: 0, count: values.count)
            for (i, d) in values.enumerated() {
                guard d.isFinite else { throw RPCError.invalidParams(path: "\(sub(key))[\(i)]", "expected a finite number") }
                out[i] = Float(d)
            }
            return out
        }
        guard let list = object[key] as? [Any] else { throw RPCError.invalidParams(path: sub(key), "expected an array of numbers") }
        return try list.enumerated().map { i, v in
            guard let d = JSONNumber.classify(v)?.double, d.isFinite else {
                throw RPCError.invalidParams(path: "\(sub(key))[\(i)]", "expected a finite number")
            }
            return Float(d)
        }
    }

    public func object(_ key: String) throws -> Params? {
        guard has(key) else { return nil }
        guard object[key] is [String: Any] else { throw RPCError.invalidParams(path: sub(key), "expected an object") }
        return try Params(object[key], path: sub(key))
    }

    /// Elements of an array of objects.
    public func objects(_ key: String) throws -> [Params] {
        guard let list = object[key] as? [Any] else { throw RPCError.invalidParams(path: sub(key), "expected an array of objects") }
        return try list.enumerated().map { i, v in
            guard v is [String: Any] else { throw RPCError.invalidParams(path: "\(sub(key))[\(i)]", "expected an object") }
            return try Params(v, path: "\(sub(key))[\(i)]")
        }
    }
}
