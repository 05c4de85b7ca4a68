// Routes: `POST /rpc` (JSON-RPC 2.0, single or batch; notifications answered with 204 when
// nothing else is), `GET /healthz`, `GET /metrics` (Prometheus text), and the OpenAI-compatible
// `GET /v1/models` and `POST /v1/completions`. Other paths 404, other methods on known paths 405.
// With an API key, every route but /healthz needs `Authorization: Bearer KEY` (401 otherwise).
// Handlers run on the server's request queue; model work goes through the Scheduler.
import Foundation
import Logging
import RPC

/// Request counts and latency by method.
/// Sendable by hand: every thread records; the tallies live under `lock`.
final class RequestMetrics: @unchecked Sendable {
    let logger: Logger
    init(logger: Logger) { self.logger = logger }
    private let lock = NSLock()
    private var requests: [String: Int] = [:]
    private var errors: [String: Int] = [:]
    private var seconds: [String: Double] = [:]

    func record(_ method: String, seconds s: Double, failed: Bool) {
        lock.lock(); defer { lock.unlock() }
        requests[method, default: 0] += 1
        seconds[method, default: 0] += s
        if failed { errors[method, default: 0] += 1 }
    }

    func snapshot() -> (requests: [String: Int], errors: [String: Int], seconds: [String: Double]) {
        lock.lock(); defer { lock.unlock() }
        return (requests, errors, seconds)
    }
}

/// Collects the answers of a JSON-RPC batch; the last one sends the response.
/// Sendable by hand: answers arrive from several threads; the slots live under `lock`.
final class BatchCollector: @unchecked Sendable {
    private let lock = NSLock()
    private var answers: [[String: Any]?]
    private var remaining: Int
    let done: @Sendable ([[String: Any]]) -> Void

    init(count: Int, done: @escaping @Sendable ([[String: Any]]) -> Void) {
        answers = Array(repeating: nil, count: count)
        remaining = count
        self.done = done
    }

    func set(_ i: Int, _ answer: [String: Any]?) {
        lock.lock()
        answers[i] = answer
        remaining -= 1
        let finished = remaining == 0
        let all = answers
        lock.unlock()
        if finished { done(all.compactMap { $0 }) }
    }
}

public enum Router {
    static let encoder = DispatchQueue(label: "ember.encode")

    public static func makeHandler(scheduler: Scheduler, apiKey: String? = nil, modelName: String = "ember",
                                   follower: WeightFollower? = nil,
                                   logger: Logger = Logger(label: "ember.server")) -> HTTPServer.Handler {
        let metrics = RequestMetrics(logger: logger)
        let openAI = OpenAIRoutes(scheduler: scheduler, modelName: modelName, logger: logger)
        let publisher = WeightPublisher(scheduler: scheduler, logger: logger)
        let weights = WeightRoutes(publisher: publisher, logger: logger)
        return { request, responder in
            logger.debug("request", metadata: ["method": "\(request.method)", "path": "\(request.path)",
                                               "bytes": "\(request.body.count)", "connection": "\(responder.connection)"])
            if let key = apiKey, request.path != "/healthz", !authorized(request, key: key) {
                logger.notice("unauthorized request", metadata: ["path": "\(request.path)", "connection": "\(responder.connection)"])
                let e = RPCError(.unauthorized, hint: "send Authorization: Bearer <api key>")
                responder.respond(HTTPResponse(status: e.kind.httpStatus, body: JSONRPC.encode(JSONRPC.response(id: nil, error: e)),
                                               headers: [("WWW-Authenticate", "Bearer")]))
                return
            }
            switch (request.method, request.path) {
            case ("GET", "/healthz"):
                if let reason = scheduler.degradedProbe?() {
                    // A data-parallel trainer that lost a rank: alive, but it trains no more.
                    let body = (try? JSONSerialization.data(withJSONObject: ["status": "degraded", "reason": reason])) ?? Data()
                    responder.respond(HTTPResponse(status: 503, body: body))
                } else {
                    responder.respond(HTTPResponse(status: 200, body: Data(#"{"status":"ok"}"#.utf8)))
                }
            case ("POST", "/rpc"):
                rpc(request.body, scheduler, metrics, responder)
            case ("GET", "/metrics"):
                responder.respond(HTTPResponse(status: 200, contentType: "text/plain; version=0.0.4",
                                               body: Data(prometheus(scheduler.gauges, metrics, publisher: publisher, follower: follower).utf8)))
            case ("GET", "/v1/weights/manifest"):
                weights.manifest(request, responder)
            case ("GET", "/v1/weights"):
                weights.weights(request, responder)
            case ("GET", "/v1/models"):
                responder.respond(openAI.models())
            case ("POST", "/v1/completions"):
                openAI.completions(request, responder)
            case ("POST", "/v1/chat/completions"):
                openAI.chatCompletions(request, responder)
            case (_, "/rpc"), (_, "/healthz"), (_, "/metrics"), (_, "/v1/models"), (_, "/v1/completions"), (_, "/v1/chat/completions"),
                 (_, "/v1/weights/manifest"), (_, "/v1/weights"):
                responder.respond(HTTPResponse(status: 405, body: Data(#"{"error":"method not allowed"}"#.utf8)))
            default:
                responder.respond(HTTPResponse(status: 404, body: Data(#"{"error":"not found"}"#.utf8)))
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

    /// Submits one call; `answer` gets its response object (nil for a notification).
    static func run(_ call: Result<RPCRequest, RPCError>, id: RequestID?, _ s: Scheduler, _ metrics: RequestMetrics,
                    owner: Int, answer: @escaping @Sendable ([String: Any]?) -> Void) {
        switch call {
        case let .failure(e):
            answer(JSONRPC.response(id: id, error: e))
        case let .success(r):
            let t0 = Date()
            // Only known method names become metric labels.
            let label = RPCMethod(rawValue: r.method)?.name ?? "unknown"
            let rid = r.id
            s.submit(method: r.method, params: r.params, id: rid, owner: owner) { result in
                let seconds = Date().timeIntervalSince(t0)
                switch result {
                case let .success(value):
                    metrics.record(label, seconds: seconds, failed: false)
                    answer(rid.map { JSONRPC.response(id: $0, result: value) })
                case let .failure(e):
                    metrics.record(label, seconds: seconds, failed: true)
                    if e.kind == .internalError { metrics.logger.error("internal error", metadata: ["method": "\(label)", "error": "\(e)"]) }
                    else { metrics.logger.debug("call failed", metadata: ["method": "\(label)", "error": "\(e)"]) }
                    answer(rid.map { JSONRPC.response(id: $0, error: e) })
                }
            }
        }
    }

    static func rpc(_ body: Data, _ s: Scheduler, _ m: RequestMetrics, _ responder: HTTPResponder) {
        let owner = responder.connection
        switch JSONRPC.decode(body) {
        case let .failure(e):
            responder.respond(HTTPResponse(status: 200, body: JSONRPC.encode(JSONRPC.response(id: nil, error: e))))
        case let .single(call, id):
            let large = (try? call.get()).flatMap { RPCMethod(rawValue: $0.method) }?.traits.largeBodies ?? false
            run(call, id: id, s, m, owner: owner) { answer in
                guard large else {
                    responder.respond(answer.map { HTTPResponse(status: 200, body: JSONRPC.encode($0)) } ?? HTTPResponse(status: 204))
                    return
                }
                // Encoding a large result happens off the compute thread.
                let box = JSONValue(answer)
                encoder.async {
                    guard let out = box.value else { responder.respond(HTTPResponse(status: 204)); return }
                    responder.respond(HTTPResponse(status: 200, body: JSONRPC.encode(out)))
                }
            }
        case let .batch(calls):
            let collector = BatchCollector(count: calls.count) { answers in
                let box = JSONValue(answers)
                encoder.async {
                    let outs = box.value as! [[String: Any]]
                    responder.respond(outs.isEmpty ? HTTPResponse(status: 204) : HTTPResponse(status: 200, body: JSONRPC.encode(outs)))
                }
            }
            for (i, c) in calls.enumerated() {
                run(c.0, id: c.1, s, m, owner: owner) { collector.set(i, $0) }
            }
        }
    }
}

extension Router {
    /// Prometheus text exposition format 0.0.4.
    static func prometheus(_ g: Scheduler.Gauges, _ metrics: RequestMetrics, publisher: WeightPublisher? = nil,
                           follower: WeightFollower? = nil) -> String {
        let m = metrics.snapshot()
        var s = ""
        func family(_ name: String, _ type: String, _ help: String) { s += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n" }
        family("ember_rpc_requests_total", "counter", "JSON-RPC calls by method")
        for (k, v) in m.requests.sorted(by: { $0.key < $1.key }) { s += "ember_rpc_requests_total{method=\"\(k)\"} \(v)\n" }
        family("ember_rpc_errors_total", "counter", "JSON-RPC calls answered with an error, by method")
        for (k, v) in m.errors.sorted(by: { $0.key < $1.key }) { s += "ember_rpc_errors_total{method=\"\(k)\"} \(v)\n" }
        family("ember_rpc_latency_seconds", "summary", "time from arrival to answer (queueing included), by method")
        for (k, v) in m.seconds.sorted(by: { $0.key < $1.key }) {
            s += "ember_rpc_latency_seconds_sum{method=\"\(k)\"} \(v)\nember_rpc_latency_seconds_count{method=\"\(k)\"} \(m.requests[k] ?? 0)\n"
        }
        let gauges: [(String, String, String, Int)] = [
            ("ember_tokens_generated_total", "counter", "tokens sampled by generate", g.tokensGenerated),
            ("ember_tokens_scored_total", "counter", "response tokens scored by logprob", g.tokensScored),
            ("ember_train_steps_total", "counter", "optimizer steps taken", g.trainSteps),
            ("ember_weights_version", "gauge", "weights version (+1 per optimizer step)", g.weightsVersion),
            ("ember_queue_depth", "gauge", "calls and prompts waiting for the compute thread or a KV slot", g.queueDepth),
            ("ember_sequences_running", "gauge", "sequences being decoded", g.running),
            ("ember_kv_cache_bytes", "gauge", "KV cache bytes allocated", g.kvBytes),
            ("ember_kv_cache_bytes_in_use", "gauge", "KV cache bytes held by running sequences", g.kvBytesInUse),
            ("ember_rollout_store_bytes", "gauge", "bytes held by the rollout store", g.rolloutBytes),
        ]
        var all: [(String, String, String, Double)] = gauges.map { ($0.0, $0.1, $0.2, Double($0.3)) }
        if let f = publisher?.figures {
            all += [("ember_weights_publications_total", "counter", "weight publications built (GET /v1/weights/manifest)", Double(f.published)),
                    ("ember_weights_served_bytes_total", "counter", "bytes of weights served by GET /v1/weights", Double(f.servedBytes)),
                    ("ember_weights_publication_bytes", "gauge", "size of the current publication's safetensors body", Double(f.imageBytes))]
        }
        if let f = follower?.figures {
            all += [("ember_weights_syncs_total", "counter", "versions this replica pulled and applied", Double(f.syncs)),
                    ("ember_weights_sync_errors_total", "counter", "failed pulls (retried)", Double(f.errors)),
                    ("ember_weights_sync_bytes_total", "counter", "bytes downloaded by weight syncs", Double(f.bytesTotal)),
                    ("ember_weights_sync_seconds_total", "counter", "seconds spent in weight syncs (download and swap)", f.secondsTotal),
                    ("ember_weights_last_sync_bytes", "gauge", "bytes downloaded by the last sync", Double(f.lastBytes)),
                    ("ember_weights_last_sync_seconds", "gauge", "seconds the last sync took", f.lastSeconds),
                    ("ember_weights_lag_versions", "gauge", "trainer's latest version seen minus the version applied", Double(f.lag))]
        }
        for (name, type, help, value) in all {
            family(name, type, help)
            s += value == value.rounded() && abs(value) < 1e15 ? "\(name) \(Int(value))\n" : "\(name) \(value)\n"
        }
        return s
    }
}
