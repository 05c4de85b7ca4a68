// ember-server: loads a Hugging Face model folder and serves the JSON-RPC protocol (plus the
// OpenAI-compatible routes) over HTTP/1.1 on TCP and optionally a Unix domain socket.
import ArgumentParser
import Foundation
import Kernels
import Logging
import Models
import RPC
import Ranks
import Server
import Tokenizer
import Weights

@main
struct EmberServer: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ember-server",
        abstract: "Serve a causal language model's policy for sampling, scoring and policy-gradient training (JSON-RPC 2.0 over HTTP).")

    @Option(help: "Hugging Face model folder (config.json, *.safetensors, tokenizer.json). Default: the embedded model.")
    var model: String?
    @Option(help: "Address to bind (IPv4 or IPv6 literal).") var host = "127.0.0.1"
    @Option(help: "TCP port (0 picks a free one).") var port = 8377
    @Option(name: .customLong("unix-socket"), help: "Also listen on this Unix domain socket path (mode 0600).") var unixSocket: String?
    @Option(name: .customLong("api-key"), help: "Bearer token required on every route but /healthz (or EMBER_API_KEY).") var apiKey: String?
    @Option(name: .customLong("checkpoint-dir"), help: "Folder that checkpoint names resolve in; checkpoints are off without it.")
    var checkpointDir: String?
    @Option(name: .customLong("adapter-dir"), help: "A folder adapters.load may read PEFT adapters from (repeatable; the checkpoint folder always may).")
    var adapterDirs: [String] = []
    @Option(name: .customLong("max-adapters"), help: "Most LoRA adapters held at once.") var maxAdapters = 64
    @Option(help: "Compute threads (default: all cores).") var threads: Int?
    @Flag(name: .customLong("read-only"), help: "Refuse every method that changes state.") var readOnly = false
    @Option(name: .customLong("weights-dtype"), help: "f32, or bf16: weights rounded to bfloat16 and streamed as bf16 when decoding (float32 accumulation; training keeps a float32 master).")
    var weightsDType = "f32"
    @Option(name: .customLong("follow"), help: "Run as a read-only sampler replica of the trainer at this URL: pull, check and swap in each new weights version.")
    var follow: String?
    @Option(name: .customLong("follow-api-key"), help: "The trainer's API key, for --follow (or EMBER_FOLLOW_API_KEY).")
    var followApiKey: String?
    @Option(name: .customLong("served-model-name"), help: "Model id for the OpenAI routes (default: the model folder's name).")
    var servedModelName: String?
    @Option(help: "Sequences decoded together (KV-cache slots).") var slots = 64
    @Option(name: .customLong("max-seq-len"), help: "Tokens per sequence (prompt + generated) the KV cache holds; default min(model positions, 2048).")
    var maxSeqLen: Int?
    @Option(name: .customLong("rollout-budget-mb"), help: "Memory budget of the rollout store (MB, fractions allowed).") var rolloutBudgetMB = 256.0
    @Option(name: .customLong("max-queued-sequences"), help: "Sequences (prompts x n) that may wait for a KV slot; generate answers overloaded beyond.")
    var maxQueuedSequences = 4096
    @Option(name: .customLong("max-request-tokens"), help: "Most tokens one call may carry or ask for.") var maxRequestTokens = 4 << 20
    @Option(name: .customLong("max-body-mb"), help: "Largest request body accepted (413 beyond).") var maxBodyMB = 64
    @Option(name: .customLong("max-connections"), help: "Open connections accepted (503 beyond).") var maxConnections = 256
    @Option(name: .customLong("request-timeout"), help: "Seconds a request may take to arrive (408 beyond).") var requestTimeout = 10.0
    @Option(name: .customLong("idle-timeout"), help: "Seconds an idle keep-alive connection stays open.") var idleTimeout = 60.0
    @Option(name: .customLong("dp-timeout"), help: "Data-parallel (under mpirun): seconds a rank may stay silent (dead or hung) before the step fails and the trainer reports itself degraded.")
    var dpTimeout = 60.0
    @Option(name: .customLong("dp-micro-batches"), help: "Data-parallel (under mpirun): micro-batches a mini-batch is cut into when train_step gives no micro_batch_tokens; the same for any number of ranks, so the weights are too.")
    var dpMicroBatches = 8
    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.") var logLevel = "info"
    @Flag(name: .customLong("protocol"), help: "Print the protocol's method and error tables as JSON and exit (scripts/make_openrpc.py reads them).")
    var printProtocol = false

    func validate() throws {
        guard (0...65535).contains(port) else { throw ValidationError("--port must be in 0...65535") }
        if let t = threads, t < 1 { throw ValidationError("--threads must be at least 1") }
        guard slots >= 1 else { throw ValidationError("--slots must be at least 1") }
        guard ["f32", "bf16"].contains(weightsDType) else { throw ValidationError("--weights-dtype: f32 or bf16, not '\(weightsDType)'") }
        if let f = follow, !(f.hasPrefix("http://") || f.hasPrefix("https://")) {
            throw ValidationError("--follow: an http:// or https:// URL of the trainer, not '\(f)'")
        }
        if followApiKey != nil && follow == nil { throw ValidationError("--follow-api-key needs --follow") }
        guard dpTimeout > 0, dpTimeout.isFinite else { throw ValidationError("--dp-timeout must be a number of seconds > 0") }
        guard dpMicroBatches >= 1 else { throw ValidationError("--dp-micro-batches must be at least 1") }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("--log-level: one of trace, debug, info, notice, warning, error, critical") }
    }

    func run() throws {
        if printProtocol {
            FileHandle.standardOutput.write(JSONRPC.encode(RPCMethod.describe()) + Data("\n".utf8))
            return
        }
        // A write to a peer that has gone (an HTTP client, or a dead MPI rank's socket) must be
        // an error to handle, not a signal that ends the process.
        signal(SIGPIPE, SIG_IGN)
        // Before anything else: OpenBLAS can only be told its kernel set at load time.
        BLASCore.restartIfMisdetected()
        if let problem = KernelSet.applyEnvironment() { throw ValidationError(problem) }
        Compute.keepFreedMemory()
        let level = Logger.Level(rawValue: logLevel)!
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let log = Logger(label: "ember.server")
        // Under mpirun: one rank of a data-parallel trainer. Rank 0 serves; the others follow it.
        let world: MPIWorld?
        do { world = try MPIWorld.fromEnvironment(timeout: dpTimeout) } catch { throw ValidationError("mpirun: \(error)") }
        if world != nil && follow != nil { throw ValidationError("--follow: a replica is one process; start it without mpirun") }
        let threads = self.threads ?? (world == nil ? ProcessInfo.processInfo.activeProcessorCount : MPIWorld.defaultThreads)
        Compute.setThreads(threads)
        if let world, world.rank != 0 {
            let code = RankCommands.runWorker(world, microBatches: dpMicroBatches) { log.info("\($0)") }
            Foundation.exit(code)
        }

        guard let dir = model ?? DefaultModel.locate() else {
            throw ValidationError("no --model given and no embedded default model found (looked in: \(DefaultModel.candidates().joined(separator: ", ")))")
        }
        let loaded: TransformerModel
        do { loaded = try TransformerModel.load(directory: dir) } catch { throw ValidationError("cannot load \(dir): \(error)") }
        // A replica is read-only to its clients: its weights change only by following.
        let readOnly = self.readOnly || follow != nil
        if weightsDType == "bf16" { loaded.parameters.useBF16(keepMaster: !readOnly) }
        var tokenizer: Tokenizer?
        if FileManager.default.fileExists(atPath: dir + "/tokenizer.json") {
            do { tokenizer = try Tokenizer(directory: dir) } catch { throw ValidationError("cannot load \(dir)/tokenizer.json: \(error)") }
        }
        let a = loaded.architecture
        let capacity = maxSeqLen ?? min(a.maxPositions, 2048)
        guard slots >= 1, capacity >= 2 else { throw ValidationError("--slots must be >= 1 and --max-seq-len >= 2") }
        guard rolloutBudgetMB >= 0, rolloutBudgetMB.isFinite else { throw ValidationError("--rollout-budget-mb must be >= 0") }
        // The KV cache is allocated up front; refuse a size the machine cannot hold rather than be
        // killed for it later.
        let kvBytes = Double(a.layers) * 2 * Double(slots) * Double(capacity) * Double(a.kvWidth) * 4
        let physical = Double(ProcessInfo.processInfo.physicalMemory)
        if kvBytes > 0.75 * physical {
            throw ValidationError(String(format: "--slots %d x --max-seq-len %d needs %.1f GB of KV cache, more than 3/4 of this machine's %.1f GB; lower --slots or --max-seq-len",
                                         slots, capacity, kvBytes / 1e9, physical / 1e9))
        }
        if let world {
            do { try RankCommands.sendInit(world, model: loaded) } catch { throw ValidationError("mpirun: sending the model to the ranks: \(error)") }
            log.notice("data-parallel trainer", metadata: ["ranks": "\(world.size)", "hosts": "\(world.hosts.joined(separator: ","))"])
            if dpMicroBatches < world.size {
                log.warning("fewer micro-batches than ranks: some ranks will have nothing to train (raise --dp-micro-batches, or send micro_batch_tokens)",
                            metadata: ["micro_batches": "\(dpMicroBatches)", "ranks": "\(world.size)"])
            }
        }
        var config = Dispatcher.Configuration()
        config.ranks = world
        config.dataParallelMicroBatches = dpMicroBatches
        config.slots = slots
        config.capacity = capacity
        config.rolloutBudgetBytes = Int(rolloutBudgetMB * 1_048_576)
        config.readOnly = readOnly
        config.maxRequestTokens = maxRequestTokens
        config.maxQueuedSequences = maxQueuedSequences
        config.maxAdapters = maxAdapters
        config.modelDirectory = URL(fileURLWithPath: dir).standardizedFileURL.path
        config.following = follow
        for d in adapterDirs {
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: d, isDirectory: &isDir), isDir.boolValue else {
                throw ValidationError("--adapter-dir \(d) is not a folder")
            }
            config.adapterDirectories.append(URL(fileURLWithPath: d).standardizedFileURL.path)
        }
        if let cdir = checkpointDir {
            let store: CheckpointStore
            do { store = try CheckpointStore.open(directory: cdir) } catch { throw ValidationError("--checkpoint-dir: \(error)") }
            for item in store.clean() {
                log.warning("removed the remains of an interrupted checkpoint save", metadata: ["entry": "\(cdir)/\(item)"])
            }
            config.checkpoints = store
        }
        let key = apiKey ?? ProcessInfo.processInfo.environment["EMBER_API_KEY"]
        let parameterCount = loaded.parameterCount, hasTokenizer = tokenizer != nil
        let scheduler = Scheduler(dispatcher: Dispatcher(model: loaded, tokenizer: tokenizer, configuration: config))
        let name = servedModelName ?? URL(fileURLWithPath: dir).standardizedFileURL.lastPathComponent
        let follower = follow.map {
            WeightFollower(url: $0, apiKey: followApiKey ?? ProcessInfo.processInfo.environment["EMBER_FOLLOW_API_KEY"], scheduler: scheduler, logger: log)
        }
        if let world { scheduler.degradedProbe = { world.failure } }
        var endpoints: [Endpoint] = [.tcp(host: host, port: port)]
        if let path = unixSocket { endpoints.append(.unix(path: path)) }
        let server: HTTPServer
        do {
            server = try HTTPServer(endpoints: endpoints, maxBodyBytes: maxBodyMB << 20,
                                    requestTimeoutMs: UInt64(requestTimeout * 1000), idleTimeoutMs: UInt64(idleTimeout * 1000),
                                    maxConnections: maxConnections, onDisconnect: { scheduler.disconnected(owner: $0) },
                                    handler: Router.makeHandler(scheduler: scheduler, apiKey: key, modelName: name, follower: follower, logger: log))
        } catch { throw ValidationError("\(error)") }
        scheduler.start()
        if let follower {
            // The replica serves only once it holds the trainer's current weights.
            log.notice("following", metadata: ["url": "\(follower.url)"])
            do { try follower.initialSync() } catch {
                scheduler.stop()
                throw ValidationError("--follow \(follower.url): \(error)")
            }
            follower.start()
        }

        // Graceful shutdown on SIGINT / SIGTERM: stop accepting, answer in-flight calls, exit 0.
        server.onSignals([SIGINT, SIGTERM]) {
            log.notice("shutting down")
            follower?.stop()
            scheduler.stop()
            server.stop()
        }
        let addresses = endpoints.enumerated().map { i, e -> String in
            if case let .tcp(h, _) = e { return Endpoint.tcp(host: h, port: server.ports[i]).description }
            return e.description
        }
        let banner = "ember-server \(EmberVersion.string): \(a.modelType) '\(name)', \(parameterCount) parameters, \(a.layers) layers, "
            + "hidden \(a.hiddenSize), vocab \(a.vocabSize)\(hasTokenizer ? "" : ", no tokenizer") | listening on "
            + addresses.joined(separator: " and ") + " | \(threads) threads, \(KernelSet.active.rawValue) kernels, \(weightsDType) weights\(follow.map { " | replica following \($0) at version \(follower!.appliedVersion)" } ?? (readOnly ? " | read-only" : ""))\(world.map { " | data-parallel, \($0.size) ranks" } ?? "")\(key != nil ? " | API key required" : "")"
        FileHandle.standardOutput.write(Data((banner + "\n").utf8))
        log.info("model loaded", metadata: ["dir": "\(dir)", "kv_slots": "\(slots)", "max_seq_len": "\(capacity)",
                                            "kv_bytes": "\(scheduler.kvCacheBytes)"])
        server.run()
        if let world {
            RankCommands.sendStop(world)
            world.finish()
        }
        FileHandle.standardOutput.write(Data("ember-server: stopped\n".utf8))
    }
}
