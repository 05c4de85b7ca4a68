// Every error the protocol can answer, in one table: per kind its JSON-RPC code, `data.kind`,
// default message and the HTTP status the OpenAI-compatible routes use. `RPCError` carries a kind
// from this table plus the parameter at fault and a hint; nothing else in the code base writes an
// error code. Protocol/openrpc.json lists the same set (a test compares them).

/// A stable error kind (`data.kind` on the wire).
public enum ErrorKind: String, CaseIterable, Sendable, Codable {
    // JSON-RPC 2.0 standard errors.
    case parseError = "parse_error"
    case invalidRequest = "invalid_request"
    case methodNotFound = "method_not_found"
    case invalidParams = "invalid_params"
    case internalError = "internal_error"
    // Domain errors (-32000...-32099).
    case contextOverflow = "context_overflow"
    case overloaded
    case unknownRollout = "unknown_rollout"
    case evictedRollout = "evicted_rollout"
    case nonFinite = "non_finite"
    case noTokenizer = "no_tokenizer"
    case unauthorized
    case readOnly = "read_only"
    case checkpointsDisabled = "checkpoints_disabled"
    case checkpointNotFound = "checkpoint_not_found"
    case checkpointFailed = "checkpoint_failed"
    case shuttingDown = "shutting_down"
    case cancelled
    case requestTooLarge = "request_too_large"
    case modelNotFound = "model_not_found"
    case unknownAdapter = "unknown_adapter"
    case adapterExists = "adapter_exists"
    case notReplica = "not_a_replica"
    case syncFailed = "sync_failed"
    case degraded

    /// Code, default message and HTTP status of a kind.
    public struct Entry: Sendable, Equatable {
        public let code: Int
        public let message: String
        public let httpStatus: Int
    }

    /// The table. Unknown and evicted rollouts share a code: a client that only reads codes
    /// treats both as "resend the sequence"; `data.kind` tells them apart.
    public var entry: Entry {
        switch self {
        case .parseError: Entry(code: -32700, message: "Parse error", httpStatus: 400)
        case .invalidRequest: Entry(code: -32600, message: "Invalid Request", httpStatus: 400)
        case .methodNotFound: Entry(code: -32601, message: "Method not found", httpStatus: 404)
        case .invalidParams: Entry(code: -32602, message: "Invalid params", httpStatus: 400)
        case .internalError: Entry(code: -32603, message: "Internal error", httpStatus: 500)
        case .contextOverflow: Entry(code: -32001, message: "Context overflow", httpStatus: 400)
        case .overloaded: Entry(code: -32002, message: "Overloaded", httpStatus: 503)
        case .unknownRollout: Entry(code: -32003, message: "Unknown rollout", httpStatus: 400)
        case .evictedRollout: Entry(code: -32003, message: "Evicted rollout", httpStatus: 400)
        case .nonFinite: Entry(code: -32004, message: "Non-finite step refused", httpStatus: 400)
        case .noTokenizer: Entry(code: -32005, message: "No tokenizer", httpStatus: 400)
        case .unauthorized: Entry(code: -32010, message: "Unauthorized", httpStatus: 401)
        case .readOnly: Entry(code: -32011, message: "Read-only server", httpStatus: 403)
        case .checkpointsDisabled: Entry(code: -32012, message: "Checkpoints disabled", httpStatus: 400)
        case .checkpointNotFound: Entry(code: -32013, message: "Checkpoint not found", httpStatus: 404)
        case .checkpointFailed: Entry(code: -32014, message: "Checkpoint not saved", httpStatus: 500)
        case .shuttingDown: Entry(code: -32015, message: "Server shutting down", httpStatus: 503)
        case .cancelled: Entry(code: -32016, message: "Cancelled", httpStatus: 400)
        case .requestTooLarge: Entry(code: -32017, message: "Request too large", httpStatus: 400)
        case .modelNotFound: Entry(code: -32020, message: "Model not found", httpStatus: 404)
        case .unknownAdapter: Entry(code: -32021, message: "Unknown adapter", httpStatus: 404)
        case .adapterExists: Entry(code: -32022, message: "Adapter exists", httpStatus: 409)
        case .notReplica: Entry(code: -32023, message: "Not a replica", httpStatus: 400)
        case .syncFailed: Entry(code: -32024, message: "Weights sync failed", httpStatus: 502)
        case .degraded: Entry(code: -32025, message: "Trainer degraded", httpStatus: 503)
        }
    }

    public var code: Int { entry.code }
    public var message: String { entry.message }
    public var httpStatus: Int { entry.httpStatus }
}

/// A JSON-RPC error: a kind from the table, the parameter at fault and a hint.
public struct RPCError: Error, Sendable, Equatable, CustomStringConvertible {
    public let kind: ErrorKind
    /// The parameter at fault, as a path (`params.sequences[2].response_start`), if any.
    public let path: String?
    /// A human hint on how to fix the call.
    public let hint: String?

    public init(_ kind: ErrorKind, path: String? = nil, hint: String? = nil) {
        self.kind = kind; self.path = path; self.hint = hint
    }

    public var code: Int { kind.code }
    public var message: String { kind.message }

    public static func parse(_ detail: String) -> RPCError { RPCError(.parseError, hint: detail) }
    public static func invalidRequest(_ detail: String) -> RPCError { RPCError(.invalidRequest, hint: detail) }
    public static func methodNotFound(_ method: String) -> RPCError {
        RPCError(.methodNotFound, path: "method", hint: "unknown method '\(method)'")
    }
    public static func invalidParams(path: String, _ detail: String) -> RPCError { RPCError(.invalidParams, path: path, hint: detail) }
    public static func internalError(_ detail: String) -> RPCError { RPCError(.internalError, hint: detail) }

    public var description: String { "\(code) \(message) [\(kind.rawValue)]\(path.map { " at \($0)" } ?? ""): \(hint ?? "")" }

    var json: [String: Any] {
        var data: [String: Any] = ["kind": kind.rawValue]
        if let path { data["path"] = path }
        if let hint { data["hint"] = hint }
        return ["code": code, "message": message, "data": data]
    }
}
