// ember: a command-line client for an Ember server, on libcurl.
//   ember info
//   ember generate --prompt "calc 2+3=" -n 4 --max-tokens 32 --temperature 0.8
//   ember logprob --json '{"sequences": [{"tokens": [1,2,3], "response_start": 1}]}'
//   ember train-step --json @batch.json
//   ember checkpoint save NAME | load NAME | list
//   ember call METHOD [JSON]
// --url (or EMBER_URL, default http://127.0.0.1:8377; unix:/path for a Unix socket) and
// --api-key (or EMBER_API_KEY). Results print as JSON on stdout. Exit status: 0 success,
// 1 the server answered with an error (printed on stderr), 3 the server could not be reached,
// 64 bad usage (ArgumentParser's EX_USAGE).
import ArgumentParser
import CCurl
import Foundation

enum Exit {
    static let rpcError: Int32 = 1
    static let transport: Int32 = 3
}

struct Connection: ParsableArguments {
    @Option(help: "Server URL (http://host:port or unix:/path/to/socket); default $EMBER_URL or http://127.0.0.1:8377.")
    var url: String?
    @Option(name: .customLong("api-key"), help: "Bearer token; default $EMBER_API_KEY.") var apiKey: String?
    @Option(help: "Seconds before giving up on an answer.") var timeout = 3600
    @Flag(help: "Pretty-print the result.") var pretty = false

    var resolvedURL: String { url ?? ProcessInfo.processInfo.environment["EMBER_URL"] ?? "http://127.0.0.1:8377" }
    var resolvedKey: String? { apiKey ?? ProcessInfo.processInfo.environment["EMBER_API_KEY"] }
}

/// The body a libcurl write callback accumulates into.
final class Sink { var data = Data() }

/// Sends one JSON-RPC call and prints its result.
func call(_ method: String, _ params: [String: Any]?, _ c: Connection) throws {
    let result = try request(method, params, c)
    let out = try JSONSerialization.data(withJSONObject: result,
                                         options: c.pretty ? [.prettyPrinted, .sortedKeys, .fragmentsAllowed] : [.sortedKeys, .fragmentsAllowed])
    FileHandle.standardOutput.write(out + Data("\n".utf8))
}

/// Points `curl` at `path` on the server (through the Unix socket for unix:/path URLs).
func setTarget(_ curl: UnsafeMutableRawPointer, _ c: Connection, path: String) {
    var base = c.resolvedURL
    if base.hasPrefix("unix:") {
        _ = ember_curl_set_string(curl, CURLOPT_UNIX_SOCKET_PATH, String(base.dropFirst(5)))
        base = "http://localhost"
    }
    _ = ember_curl_set_string(curl, CURLOPT_URL, (base.hasSuffix("/") ? base : base + "/") + path)
}

/// Sends one JSON-RPC call and returns its result; prints the error and exits on failure.
func request(_ method: String, _ params: [String: Any]?, _ c: Connection) throws -> Any {
    var payload: [String: Any] = ["jsonrpc": "2.0", "method": method, "id": 1]
    if let params, !params.isEmpty { payload["params"] = params }
    let body = try JSONSerialization.data(withJSONObject: payload)
    guard let curl = curl_easy_init() else { fail("cannot initialise libcurl", Exit.transport) }
    defer { curl_easy_cleanup(curl) }
    setTarget(curl, c, path: "rpc")
    var headers: UnsafeMutablePointer<curl_slist>? = curl_slist_append(nil, "Content-Type: application/json")
    if let key = c.resolvedKey, !key.isEmpty { headers = curl_slist_append(headers, "Authorization: Bearer \(key)") }
    defer { curl_slist_free_all(headers) }
    _ = ember_curl_set_pointer(curl, CURLOPT_HTTPHEADER, UnsafeMutableRawPointer(headers))
    _ = ember_curl_set_long(curl, CURLOPT_TIMEOUT, c.timeout)
    _ = ember_curl_set_long(curl, CURLOPT_POSTFIELDSIZE, body.count)
    let sink = Sink()
    let result: CURLcode = body.withUnsafeBytes { raw in
        _ = ember_curl_set_pointer(curl, CURLOPT_POSTFIELDS, UnsafeMutableRawPointer(mutating: raw.baseAddress!))
        _ = ember_curl_set_write(curl) { ptr, size, count, user in
            let s = Unmanaged<Sink>.fromOpaque(user!).takeUnretainedValue()
            s.data.append(UnsafeRawPointer(ptr!).assumingMemoryBound(to: UInt8.self), count: size * count)
            return size * count
        }
        _ = ember_curl_set_pointer(curl, CURLOPT_WRITEDATA, Unmanaged.passUnretained(sink).toOpaque())
        return curl_easy_perform(curl)
    }
    guard result == CURLE_OK else {
        fail("cannot reach \(c.resolvedURL): \(String(cString: curl_easy_strerror(result)))", Exit.transport)
    }
    var status = 0
    _ = ember_curl_get_status(curl, &status)
    guard let answer = try? JSONSerialization.jsonObject(with: sink.data) as? [String: Any] else {
        fail("HTTP \(status): \(String(decoding: sink.data.prefix(300), as: UTF8.self))", Exit.transport)
    }
    if let error = answer["error"] as? [String: Any] {
        let data = error["data"] as? [String: Any] ?? [:]
        var line = "error \(error["code"] ?? "?"): \(error["message"] ?? "")"
        if let kind = data["kind"] { line += " [\(kind)]" }
        if let path = data["path"] { line += " at \(path)" }
        if let hint = data["hint"] { line += ": \(hint)" }
        fail(line, Exit.rpcError)
    }
    return answer["result"] ?? NSNull()
}

func fail(_ message: String, _ code: Int32) -> Never {
    FileHandle.standardError.write(Data("ember: \(message)\n".utf8))
    exit(code)
}

/// `--json '{...}'` or `--json @file.json` as an object.
func jsonObject(_ text: String?) throws -> [String: Any] {
    guard let text else { return [:] }
    let data: Data
    if text.hasPrefix("@") {
        guard let d = FileManager.default.contents(atPath: String(text.dropFirst())) else { throw ValidationError("cannot read \(text.dropFirst())") }
        data = d
    } else {
        data = Data(text.utf8)
    }
    guard let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
        throw ValidationError("--json must be a JSON object (or @file holding one)")
    }
    return obj
}

@main
struct Ember: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ember", abstract: "Talk to an Ember server (JSON-RPC over HTTP, via libcurl).",
        subcommands: [Info.self, Generate.self, Logprob.self, TrainStep.self, Checkpoint.self, Call.self, Health.self])
}

struct Health: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "GET /healthz: exit 0 when the server answers 200 (no API key needed).")
    @OptionGroup var connection: Connection
    func run() throws {
        guard let curl = curl_easy_init() else { fail("cannot initialise libcurl", Exit.transport) }
        defer { curl_easy_cleanup(curl) }
        setTarget(curl, connection, path: "healthz")
        _ = ember_curl_set_long(curl, CURLOPT_TIMEOUT, min(connection.timeout, 10))
        _ = ember_curl_set_write(curl) { _, size, count, _ in size * count }   // discard the body
        let rc = curl_easy_perform(curl)
        guard rc == CURLE_OK else { fail("cannot reach \(connection.resolvedURL): \(String(cString: curl_easy_strerror(rc)))", Exit.transport) }
        var status = 0
        _ = ember_curl_get_status(curl, &status)
        guard status == 200 else { fail("unhealthy: HTTP \(status)", Exit.rpcError) }
        print("ok")
    }
}

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "server.info: model, weights version, capabilities.")
    @OptionGroup var connection: Connection
    func run() throws { try call("server.info", nil, connection) }
}

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "generate: sample continuations.")
    @OptionGroup var connection: Connection
    @Option(name: .customLong("prompt"), help: "A prompt (repeat for several).") var prompts: [String] = []
    @Option(name: .short, help: "Samples per prompt.") var n: Int?
    @Option(name: .customLong("max-tokens")) var maxTokens: Int?
    @Option var temperature: Double?
    @Option(name: .customLong("top-p")) var topP: Double?
    @Option(name: .customLong("top-k")) var topK: Int?
    @Option(name: .customLong("min-p")) var minP: Double?
    @Option var seed: Int?
    @Option(help: "A stop string (repeat for several).") var stop: [String] = []
    @Option(help: "Parameters as JSON (or @file); flags override its keys.") var json: String?
    @Flag(help: "Print only the sampled texts, one per line.") var text = false

    func run() throws {
        var p = try jsonObject(json)
        if !prompts.isEmpty { p["prompts"] = prompts }
        if let n { p["n"] = n }
        if let maxTokens { p["max_tokens"] = maxTokens }
        if let temperature { p["temperature"] = temperature }
        if let topP { p["top_p"] = topP }
        if let topK { p["top_k"] = topK }
        if let minP { p["min_p"] = minP }
        if let seed { p["seed"] = seed }
        if !stop.isEmpty { p["stop"] = stop }
        guard p["prompts"] != nil || p["prompt_tokens"] != nil else { throw ValidationError("give --prompt or prompts/prompt_tokens in --json") }
        if text {
            let result = try request("generate", p, connection) as? [String: Any]
            for r in result?["results"] as? [[String: Any]] ?? [] {
                for s in r["samples"] as? [[String: Any]] ?? [] { print(s["text"] as? String ?? "") }
            }
        } else {
            try call("generate", p, connection)
        }
    }
}

struct Logprob: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "logprob: score token sequences.")
    @OptionGroup var connection: Connection
    @Option(help: "Parameters as JSON (or @file): {\"sequences\": [{\"tokens\": [...], \"response_start\": k}]}.") var json: String
    func run() throws { try call("logprob", try jsonObject(json), connection) }
}

struct TrainStep: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "train-step", abstract: "train_step: one policy-gradient update.")
    @OptionGroup var connection: Connection
    @Option(help: "Parameters as JSON (or @file): batch or rollouts, loss, optimizer, ...") var json: String
    @Option(help: "Loss mode (overrides loss.mode in --json).") var loss: String?
    @Flag(name: .customLong("dry-run"), help: "Compute everything, change nothing.") var dryRun = false
    func run() throws {
        var p = try jsonObject(json)
        if let loss {
            var l = p["loss"] as? [String: Any] ?? [:]
            l["mode"] = loss
            p["loss"] = l
        }
        if dryRun { p["dry_run"] = true }
        try call("train_step", p, connection)
    }
}

struct Checkpoint: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "checkpoint save NAME | load NAME | list")
    @OptionGroup var connection: Connection
    @Argument(help: "save, load or list") var action: String
    @Argument var name: String?
    func validate() throws {
        guard ["save", "load", "list"].contains(action) else { throw ValidationError("action must be save, load or list") }
        if action != "list" && name == nil { throw ValidationError("checkpoint \(action) needs a NAME") }
    }
    func run() throws {
        try call("checkpoint.\(action)", name.map { ["name": $0] }, connection)
    }
}

struct Call: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Any method by name: ember call METHOD [JSON].")
    @OptionGroup var connection: Connection
    @Argument var method: String
    @Argument(help: "Parameters as a JSON object (or @file).") var json: String?
    func run() throws { try call(method, try jsonObject(json), connection) }
}
