// Routes: `POST /rpc` (JSON-RPC 2.0, single or batch; notifications answered with 204 when
// nothing else is), `GET /healthz`. Other paths 404, other methods on known paths 405. With an
// API key, every route but /healthz needs `Authorization: Bearer KEY` (401 otherwise).
import Foundation
import RPC

/// Request counts and latency by method (touched only on the compute queue).
final class RequestMetrics: @unchecked Sendable {
    var requests: [String: Int] = [:]
    var errors: [String: Int] = [:]
    var seconds: [String: Double] = [:]

    func record(_ method: String, seconds s: Double, failed: Bool) {
        requests[method, default: 0] += 1
        seconds[method, default: 0] += s
        if failed { errors[method, default: 0] += 1 }
    }
}

public enum Router {
    public static func makeHandler(dispatcher: Dispatcher, apiKey: String? = nil) -> HTTPServer.Handler {
        let metrics = RequestMetrics()
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
                return rpc(request.body, dispatcher, metrics)
            case ("GET", "/metrics"):
                return HTTPResponse(status: 200, contentType: "text/plain; version=0.0.4", body: Data(prometheus(dispatcher, metrics).utf8))
            case (_, "/rpc"), (_, "/healthz"), (_, "/metrics"):
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

    static func run(_ call: Result<RPCRequest, RPCError>, id: RequestID?, _ d: Dispatcher,
                    _ metrics: RequestMetrics) -> [String: Any]? {
        switch call {
        case let .failure(e):
            return JSONRPC.response(id: id, error: e)
        case let .success(r):
            let t0 = Date()
            // Only known method names become metric labels.
            let label = Dispatcher.methods.contains(r.method) ? r.method : "unknown"
            do {
                let result = try d.call(r.method, r.params)
                metrics.record(label, seconds: Date().timeIntervalSince(t0), failed: false)
                return r.id.map { JSONRPC.response(id: $0, result: result) }
            } catch let e as RPCError {
                metrics.record(label, seconds: Date().timeIntervalSince(t0), failed: true)
                return r.id.map { JSONRPC.response(id: $0, error: e) }
            } catch {
                metrics.record(label, seconds: Date().timeIntervalSince(t0), failed: true)
                return r.id.map { JSONRPC.response(id: $0, error: .internalError("\(error)")) }
            }
        }
    }

    static func rpc(_ body: Data, _ d: Dispatcher, _ m: RequestMetrics) -> HTTPResponse {
        switch JSONRPC.decode(body) {
        case let .failure(e):
            return HTTPResponse(status: 200, body: JSONRPC.encode(JSONRPC.response(id: nil, error: e)))
        case let .single(call, id):
            guard let out = run(call, id: id, d, m) else { return HTTPResponse(status: 204) }
            return HTTPResponse(status: 200, body: JSONRPC.encode(out))
        case let .batch(calls):
            let outs = calls.compactMap { run($0.0, id: $0.1, d, m) }
            return outs.isEmpty ? HTTPResponse(status: 204) : HTTPResponse(status: 200, body: JSONRPC.encode(outs))
        }
    }
}

extension Router {
    /// Prometheus text exposition format 0.0.4.
    static func prometheus(_ d: Dispatcher, _ m: RequestMetrics) -> String {
        var s = ""
        func family(_ name: String, _ type: String, _ help: String) { s += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n" }
        family("ember_rpc_requests_total", "counter", "JSON-RPC calls by method")
        for (k, v) in m.requests.sorted(by: { $0.key < $1.key }) { s += "ember_rpc_requests_total{method=\"\(k)\"} \(v)\n" }
        family("ember_rpc_errors_total", "counter", "JSON-RPC calls answered with an error, by method")
        for (k, v) in m.errors.sorted(by: { $0.key < $1.key }) { s += "ember_rpc_errors_total{method=\"\(k)\"} \(v)\n" }
        family("ember_rpc_latency_seconds", "summary", "time spent computing calls, by method")
        for (k, v) in m.seconds.sorted(by: { $0.key < $1.key }) {
            s += "ember_rpc_latency_seconds_sum{method=\"\(k)\"} \(v)\nember_rpc_latency_seconds_count{method=\"\(k)\"} \(m.requests[k] ?? 0)\n"
        }
        family("ember_tokens_generated_total", "counter", "tokens sampled by generate")
        s += "ember_tokens_generated_total \(d.tokensGenerated)\n"
        family("ember_tokens_scored_total", "counter", "response tokens scored by logprob")
        s += "ember_tokens_scored_total \(d.tokensScored)\n"
        family("ember_train_steps_total", "counter", "optimizer steps taken")
        s += "ember_train_steps_total \(d.trainer.optimizer.stepCount)\n"
        family("ember_weights_version", "gauge", "weights version (+1 per optimizer step)")
        s += "ember_weights_version \(d.trainer.weightsVersion)\n"
        family("ember_generation_queue_depth", "gauge", "prompts waiting for a KV slot")
        s += "ember_generation_queue_depth \(d.generator.waitingCount)\n"
        family("ember_kv_cache_bytes", "gauge", "KV cache bytes allocated")
        s += "ember_kv_cache_bytes \(d.generator.kvCacheBytes)\n"
        family("ember_kv_cache_bytes_in_use", "gauge", "KV cache bytes held by running sequences")
        s += "ember_kv_cache_bytes_in_use \(d.generator.kvBytesInUse)\n"
        family("ember_rollout_store_bytes", "gauge", "bytes held by the rollout store")
        s += "ember_rollout_store_bytes \(d.rollouts.bytes)\n"
        return s
    }
}
