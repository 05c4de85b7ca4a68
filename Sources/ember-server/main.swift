// ember-server: loads a Hugging Face model folder and serves the JSON-RPC protocol over HTTP.
//   ember-server --model DIR [--host 127.0.0.1] [--port 8377] [--threads N] [--api-key KEY]
//                [--checkpoint-dir DIR] [--read-only]
// (the embedded default model arrives with issue 8.) EMBER_API_KEY sets the key too.
import Foundation
import Kernels
import Models
import RPC
import Server
import Tokenizer

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("ember-server: \(message)\n".utf8))
    exit(2)
}

var options: [String: String] = [:]
var args = CommandLine.arguments.dropFirst()
while let a = args.popFirst() {
    guard a.hasPrefix("--") else { fail("unexpected argument '\(a)'") }
    let key = String(a.dropFirst(2))
    if key == "read-only" { options[key] = "1"; continue }
    guard ["model", "host", "port", "threads", "api-key", "checkpoint-dir"].contains(key) else {
        fail("unknown option --\(key) (known: --model, --host, --port, --threads, --api-key, --checkpoint-dir, --read-only)")
    }
    guard let v = args.popFirst() else { fail("--\(key) needs a value") }
    options[key] = v
}
guard let dir = options["model"] else {
    fail("--model DIR is required (the embedded default model is not built yet)")
}
guard let port = Int(options["port"] ?? "8377"), (0...65535).contains(port) else { fail("--port must be 0...65535") }
let threads = Int(options["threads"] ?? "") ?? ProcessInfo.processInfo.activeProcessorCount
guard threads >= 1 else { fail("--threads must be at least 1") }
Compute.setThreads(threads)

let model: TransformerModel
do { model = try TransformerModel.load(directory: dir) } catch { fail("cannot load \(dir): \(error)") }
let tokenizer = FileManager.default.fileExists(atPath: dir + "/tokenizer.json") ? (try? Tokenizer(directory: dir)) : nil
let dispatcher = Dispatcher(model: model, tokenizer: tokenizer)
dispatcher.readOnly = options["read-only"] != nil
if let dir = options["checkpoint-dir"] {
    do { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) } catch { fail("--checkpoint-dir: \(error)") }
    dispatcher.checkpointDirectory = dir
}
let apiKey = options["api-key"] ?? ProcessInfo.processInfo.environment["EMBER_API_KEY"]
let host = options["host"] ?? "127.0.0.1"
let server: HTTPServer
do { server = try HTTPServer(host: host, port: port, handler: Router.makeHandler(dispatcher: dispatcher, apiKey: apiKey)) } catch { fail("\(error)") }

// Graceful shutdown on SIGINT / SIGTERM.
signal(SIGINT, SIG_IGN)
signal(SIGTERM, SIG_IGN)
let sources = [SIGINT, SIGTERM].map { sig -> DispatchSourceSignal in
    let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
    s.setEventHandler { server.stop() }
    s.resume()
    return s
}
let a = model.architecture
let banner = ("ember-server: \(a.modelType) \(model.parameterCount) parameters, \(a.layers) layers, hidden \(a.hiddenSize), vocab \(a.vocabSize)"
      + "\(tokenizer == nil ? ", no tokenizer" : "") | listening on http://\(host.contains(":") ? "[\(host)]" : host):\(server.port) | \(threads) threads\n")
FileHandle.standardOutput.write(Data(banner.utf8))
server.run()
withExtendedLifetime(sources) {}
FileHandle.standardOutput.write(Data("ember-server: stopped\n".utf8))
