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
let dispatcher: Dispatcher = {
    let d = Dispatcher(model: try! TransformerModel.load(directory: fixture), tokenizer: nil, slots: 2, capacity: 32,
                       rolloutBudgetBytes: 1 << 20)
    d.maxRequestTokens = 128
    d.readOnly = true   // state-changing calls are refused early: each input sees the same model
    return d
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
