// Routes: `POST /rpc` (JSON-RPC 2.0, single or batch; notifications answered with 204 when
// nothing else is), `GET /healthz`. Other paths 404, other methods on known paths 405.
import Foundation
import RPC

public enum Router {
    public static func makeHandler(dispatcher: Dispatcher) -> HTTPServer.Handler {
        return { request in
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
