// JSON-RPC decoding and parameter validation: the input is a request body; every call it holds
// goes through the dispatcher of a tiny model (small limits keep each call cheap). Deep nesting,
// huge numbers and invalid UTF-8 must come back as errors.
import Foundation
import FuzzCommon
import Kernels
import Models
import RPC

let fixture = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Tests/Fixtures/models/qwen2_tied").path
Compute.setThreads(1)
// libFuzzer calls the harness on one thread.
nonisolated(unsafe) let dispatcher: Dispatcher = {
    var config = Dispatcher.Configuration()
    config.slots = 2
    config.capacity = 32
    config.rolloutBudgetBytes = 1 << 20
    config.maxRequestTokens = 128
    config.readOnly = true   // state-changing calls are refused early: each input sees the same model
    return Dispatcher(model: try! TransformerModel.load(directory: fixture), tokenizer: nil, configuration: config)
}()

runFuzzer { data, size in
    let body = Data(bytes: data!, count: size)
    func run(_ call: Result<RPCRequest, RPCError>) {
        guard case let .success(r) = call else { return }
        _ = try? dispatcher.call(r.method, r.params)
    }
    switch JSONRPC.decode(body) {
    case .failure: break
    case let .single(call, _): run(call)
    case let .batch(calls): calls.prefix(4).forEach { run($0.0) }
    }
    return 0
}
