// Routes: `POST /rpc` (JSON-RPC 2.0, single or batch; notifications answered with 204 when
// nothing else is), `GET /healthz`. Other paths 404, other methods on known paths 405. With an
// API key, every route but /healthz needs `Authorization: Bearer KEY` (401 otherwise).
import Foundation
import RPC

public enum Router {
    public static func makeHandler(dispatcher: Dispatcher, apiKey: String? = nil) -> HTTPServer.Handler {
        return { request in
            if let key = apiKey, request.path != "/healthz", !authorized(request, key: key) {
                let e = RPCError.domain(-32010, kind: "unauthorized", message: "Unauthorized",
                                        hint: "send Authorization: Bearer <api key>")
                return HTTPResponse(status: 401, body: JSONRPC.encode(JSONRPC.response(id: nil, error: e)))
            }
            switch (request.method, request.path) {
            case ("GET", "/healthz"):
                return HTTPResponse(status: 200, body: Data(#"{"status":"ok"}"#.utf8))
            case ("POST", "/rpc"):
                return rpc(request.body, dispatcher)
            case (_, "/rpc"), (_, "/healthz"):
                return HTTPResponse(status: 405, body: Data(#"{"error":"method not allowed"}"#.utf8))
            default:
                return HTTPResponse(status: 404, body: Data(#"{"error":"not found"}"#.utf8))
            }
        }
    }

    /// Constant-time comparison of the bearer token with the key.
    static func authorized(_ request: HTTPRequest, key: String) -> Bool {
        guard let h = request.header("Authorization"), h.hasPrefix("Bearer ") else { return false }
        let given = Array(h.dropFirst(7).utf8), want = Array(key.utf8)
        var diff = given.count ^ want.count
        for i in 0..<max(given.count, want.count) {
            diff |= Int((i < given.count ? given[i] : 0) ^ (i < want.count ? want[i] : 0))
        }
        return diff == 0
    }

    static func run(_ call: Result<RPCRequest, RPCError>, id: RequestID?, _ d: Dispatcher) -> [String: Any]? {
        switch call {
        case let .failure(e):
            return JSONRPC.response(id: id, error: e)
        case let .success(r):
            do {
                let result = try d.call(r.method, r.params)
                return r.id.map { JSONRPC.response(id: $0, result: result) }
            } catch let e as RPCError {
                return r.id.map { JSONRPC.response(id: $0, error: e) }
            } catch {
                return r.id.map { JSONRPC.response(id: $0, error: .internalError("\(error)")) }
            }
        }
    }

    static func rpc(_ body: Data, _ d: Dispatcher) -> HTTPResponse {
        switch JSONRPC.decode(body) {
        case let .failure(e):
            return HTTPResponse(status: 200, body: JSONRPC.encode(JSONRPC.response(id: nil, error: e)))
        case let .single(call, id):
            guard let out = run(call, id: id, d) else { return HTTPResponse(status: 204) }
            return HTTPResponse(status: 200, body: JSONRPC.encode(out))
        case let .batch(calls):
            let outs = calls.compactMap { run($0.0, id: $0.1, d) }
            return outs.isEmpty ? HTTPResponse(status: 204) : HTTPResponse(status: 200, body: JSONRPC.encode(outs))
        }
    }
}
