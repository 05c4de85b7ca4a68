// The protocol's methods, transport-free: a method and its params go in, a JSON value or an
// `RPCError` comes out. The dispatcher owns the model, tokenizer, generator, trainer, rollout
// store and checkpoint store, and is not Sendable: in the server only the scheduler's compute
// thread reaches it; tests call it directly. Engine errors become protocol errors in
// `translate`, by case, never by message text.
//   Dispatcher.swift           configuration, the method switch, errors, info, tokenizer, checkpoints
//   Dispatcher+Sampling.swift  generate and logprob: parsing, submission, results
//   Dispatcher+Training.swift  train_step, optimizer.configure, loss options and their defaults
import Chat
import Engine
import Foundation
import Kernels
import Models
import Ranks
import Tokenizer
import Weights

/// The server's version (server.info, the banner, the CLI and the Python package report it).
public enum EmberVersion {
    public static let string = "0.1.0"
}

public final class Dispatcher {
    /// Settings fixed at construction.
    public struct Configuration: Sendable {
        /// Sequences decoded together (KV-cache slots) and tokens per sequence.
        public var slots = 64
        public var capacity = 2048
        public var rolloutBudgetBytes = 256 << 20
        /// Refuses every method the protocol table marks as mutating.
        public var readOnly = false
        /// Where checkpoint names resolve; nil: checkpoints disabled.
        public var checkpoints: CheckpointStore?
        /// Most tokens one call may carry or ask for (prompt + generated for generate, all
        /// tokens for logprob and train_step); beyond it the call is refused as `request_too_large`.
        public var maxRequestTokens = 4 << 20
        /// Sequences (prompts x n) that may wait for a KV slot; beyond it generate is `overloaded`.
        public var maxQueuedSequences = 4096
        /// Folders `adapters.load` may read besides the checkpoint directory (`--adapter-dir`).
        public var adapterDirectories: [String] = []
        /// Most adapters held at once (`--max-adapters`).
        public var maxAdapters = 64
        /// The model folder the server loaded: a merged checkpoint gets its tokenizer files.
        public var modelDirectory: String?
        /// The trainer a replica follows (`--follow`); nil for a trainer.
        public var following: String?
        /// The ranks of a data-parallel trainer (the server started by mpirun; this is rank 0).
        public var ranks: MPIWorld?
        /// Micro-batches per mini-batch on a data-parallel trainer without micro_batch_tokens.
        public var dataParallelMicroBatches = 8
        public init() {}
    }

    public let configuration: Configuration
    public let model: TransformerModel
    public let tokenizer: Tokenizer?
    public let generator: Generator
    public let trainer: Trainer
    public let rollouts: RolloutStore
    /// LoRA adapters by name, each with its own trainer (AdamW state, schedule, weights version,
    /// reference); `adapterOrder` keeps creation order for listings.
    var adapterTrainers: [String: Trainer] = [:]
    var adapterOrder: [String] = []
    /// A replica's adapters replaced by its last swap, by name: the next update of that adapter
    /// loads into one of them when nothing else holds it (fresh pages cost more than the copy).
    var spareAdapters: [String: LoRAAdapter] = [:]
    /// The model folder's chat template, read at start.
    enum ChatTemplateState { case absent, loaded(ChatTemplate), failed(String) }
    let chatTemplateState: ChatTemplateState
    /// Counters for /metrics.
    public internal(set) var tokensGenerated = 0
    public internal(set) var tokensScored = 0

    public init(model: sending TransformerModel, tokenizer: sending Tokenizer?, configuration: Configuration = Configuration()) {
        self.configuration = configuration
        self.model = model
        self.tokenizer = tokenizer
        rollouts = RolloutStore(budgetBytes: configuration.rolloutBudgetBytes)
        generator = Generator(model: model, tokenizer: tokenizer, slots: configuration.slots, capacity: configuration.capacity,
                              rolloutStore: rollouts, maxQueuedSequences: configuration.maxQueuedSequences)
        trainer = Trainer(model: model)
        if let world = configuration.ranks {
            trainer.group = world
            trainer.dataParallelMicroBatches = configuration.dataParallelMicroBatches
        }
        var state = ChatTemplateState.absent
        if let dir = configuration.modelDirectory {
            do { state = try ChatTemplate.load(directory: dir).map { .loaded($0) } ?? .absent } catch { state = .failed("\(error)") }
        }
        chatTemplateState = state
    }

    /// Runs one call by name (`method_not_found` for a name outside the protocol table).
    public func call(_ method: String, _ rawParams: Any?) throws -> Any {
        try call(try RPCMethod.named(method), rawParams)
    }

    /// Runs one call.
    public func call(_ method: RPCMethod, _ rawParams: Any?) throws -> Any {
        let p = try Params(rawParams)
        if configuration.readOnly && method.traits.mutates && !(method == .trainStep && (try? p.bool("dry_run", false)) == true) {
            throw RPCError(.readOnly, path: "method", hint: "this server was started with --read-only; \(method.name) would change state")
        }
        do {
            switch method {
            case .serverInfo:
                try p.only([])
                return serverInfo()
            case .tokenize: return try tokenize(p)
            case .detokenize: return try detokenize(p)
            case .generate: return try generate(p)
            case .logprob: return try logprob(p)
            case .trainStep: return try trainStep(p)
            case .optimizerConfigure: return try configure(p)
            case .referenceSnapshot:
                try p.only(["adapter"])
                let t = try trainer(for: p)
                try t.snapshotReference()
                if let world = configuration.ranks, t.group != nil, world.failure == nil { try RankCommands.sendSnapshot(world) }
                return ["weights_version": t.weightsVersion]
            case .rolloutsRelease:
                try p.only(["rollout_ids"])
                return ["released": rollouts.release(try p.strings("rollout_ids"))]
            case .checkpointSave: return try checkpointSave(p)
            case .checkpointLoad: return try checkpointLoad(p)
            case .checkpointList:
                try p.only([])
                return ["names": try checkpointStore().names()]
            case .chatRender: return try chatRender(p)
            case .adaptersCreate: return try adaptersCreate(p)
            case .adaptersList:
                try p.only([])
                return ["adapters": adapterOrder.map { adapterInfo(adapterTrainers[$0]!) }]
            case .adaptersDelete: return try adaptersDelete(p)
            case .adaptersLoad: return try adaptersLoad(p)
            case .adaptersSave: return try adaptersSave(p)
            case .adaptersMerge: return try adaptersMerge(p)
            case .weightsSync:
                throw RPCError(.notReplica, path: "method",
                               hint: "weights.sync is answered by a replica's weight follower (ember-server --follow URL), not by the dispatcher")
            case .cancel:
                throw RPCError(.invalidRequest, path: "method",
                               hint: "cancel acts on the server's queues; a dispatcher called directly runs one call at a time and has nothing to cancel")
            }
        } catch {
            throw Self.translate(error)
        }
    }

    /// Any error as a protocol error: engine errors map by case to their kind and parameter path.
    public static func translate(_ error: Error) -> RPCError {
        switch error {
        case let e as RPCError: return e
        case let e as RankFailure: return Self.degraded(e.reason)
        case let e as GenerationError:
            switch e {
            case let .contextOverflow(p, _, _): return RPCError(.contextOverflow, path: "params.prompts[\(p)]", hint: "\(e)")
            case let .invalidParameter(name, reason): return .invalidParams(path: "params.\(name)", reason)
            case let .overloaded(reason): return RPCError(.overloaded, hint: reason)
            }
        case let e as RolloutError: return rolloutError(e, path: "params.rollouts")
        case let e as NonFiniteError: return RPCError(.nonFinite, hint: "\(e)")
        case let e as TrainError:
            switch e {
            case let .invalid(path, reason): return .invalidParams(path: "params.\(path)", reason)
            case let .rollout(index, r): return rolloutError(r, path: "params.rollouts[\(index)].rollout_id")
            }
        case let e as ScoringError:
            if case let .invalid(path, reason) = e { return .invalidParams(path: "params.\(path)", reason) }
        case let e as CheckpointStoreError:
            switch e {
            case .invalidName: return .invalidParams(path: "params.name", "\(CheckpointStore.nameRule)")
            case let .notFound(name):
                return RPCError(.checkpointNotFound, path: "params.name", hint: "no checkpoint named '\(name)'; checkpoint.list shows the saved ones")
            case .saveFailed:
                return RPCError(.checkpointFailed, path: "params.name", hint: "\(e) and the server keeps its weights (free disk space, then save again)")
            }
        case let e as InputError: return .invalidParams(path: "params", "\(e)")
        case let e as LoRAError:
            if case let .invalid(path, reason) = e { return .invalidParams(path: "params.\(path)", reason) }
        case let e as TokenizerError: return .invalidParams(path: "params", "\(e)")
        default: break
        }
        return .internalError("\(error)")
    }

    static func rolloutError(_ e: RolloutError, path: String) -> RPCError {
        switch e {
        case .unknown: RPCError(.unknownRollout, path: path, hint: "\(e)")
        case .evicted: RPCError(.evictedRollout, path: path, hint: "\(e)")
        }
    }

    /// Refuses a call carrying or asking for more than `maxRequestTokens`.
    func limit(_ tokens: Int, _ path: String) throws {
        let most = configuration.maxRequestTokens
        guard tokens <= most else {
            throw RPCError(.requestTooLarge, path: path,
                           hint: "the call carries or asks for \(tokens) tokens; this server accepts at most \(most) per call (--max-request-tokens); split it")
        }
    }

    // MARK: - server.info

    public func serverInfo() -> [String: Any] {
        let a = model.architecture
        return ["name": "ember", "version": EmberVersion.string, "weights_version": trainer.weightsVersion,
                "model": ["model_type": a.modelType, "parameters": model.parameterCount, "layers": a.layers,
                          "hidden_size": a.hiddenSize, "vocab_size": a.vocabSize, "max_position_embeddings": a.maxPositions,
                          "heads": a.heads, "kv_heads": a.kvHeads, "head_dim": a.headDim, "tied_embeddings": a.tiedEmbeddings],
                "capabilities": RPCMethod.names, "loss_defaults": LossDefaults.json,
                "weights_dtype": model.parameters.storage == .bf16 ? "bf16" : "f32",
                "kernels": ["set": KernelSet.active.rawValue, "supported": KernelSet.supported.map(\.rawValue),
                            "backward_gemm": Compute.backwardBLAS ? "openblas" : "ember", "blas": "OpenBLAS " + BLASCore.name],
                "limits": ["max_seq_len": configuration.capacity, "slots": configuration.slots],
                "role": configuration.following == nil ? "trainer" : "replica",
                "following": configuration.following.map { $0 as Any } ?? NSNull(),
                "world_size": configuration.ranks?.size ?? 1, "data_parallel": dataParallelInfo()]
    }

    /// The ranks (null without mpirun): hosts by rank, micro-batches per mini-batch, the silence
    /// timeout, and why the trainer is degraded once it is.
    func dataParallelInfo() -> Any {
        guard let w = configuration.ranks else { return NSNull() }
        return ["hosts": w.hosts, "micro_batches": trainer.dataParallelMicroBatches, "timeout": w.timeout,
                "degraded": w.failure.map { $0 as Any } ?? NSNull()]
    }

    static func degraded(_ reason: String) -> RPCError {
        RPCError(.degraded, hint: "\(reason). This data-parallel trainer is degraded: it still samples and saves checkpoints but trains no more; restart the job (mpirun) and load the last checkpoint")
    }

    // MARK: - Tokenizer

    public func needTokenizer() throws -> Tokenizer {
        guard let t = tokenizer else { throw RPCError(.noTokenizer, hint: "the model folder has no tokenizer.json; send token ids") }
        return t
    }

    func tokenize(_ p: Params) throws -> Any {
        try p.only(["text", "texts", "add_special_tokens"])
        let tok = try needTokenizer()
        let special = try p.bool("add_special_tokens", true)
        if p.has("text") { return ["tokens": try tok.encode(try p.string("text"), addSpecialTokens: special).map(Int.init)] }
        guard p.has("texts") else { throw RPCError.invalidParams(path: "params.text", "give text or texts") }
        return ["token_lists": try p.strings("texts").map { try tok.encode($0, addSpecialTokens: special).map(Int.init) }]
    }

    func detokenize(_ p: Params) throws -> Any {
        try p.only(["tokens", "token_lists", "skip_special_tokens"])
        let tok = try needTokenizer()
        let skip = try p.bool("skip_special_tokens", false)
        if p.has("tokens") { return ["text": try tok.decode(try p.tokens("tokens"), skipSpecialTokens: skip)] }
        guard p.has("token_lists") else { throw RPCError.invalidParams(path: "params.tokens", "give tokens or token_lists") }
        return ["texts": try p.tokenLists("token_lists").map { try tok.decode($0, skipSpecialTokens: skip) }]
    }

    // MARK: - Checkpoints (the store keeps them crash-safe; here only parameters and results)

    func checkpointStore() throws -> CheckpointStore {
        guard let store = configuration.checkpoints else {
            throw RPCError(.checkpointsDisabled, hint: "start the server with --checkpoint-dir DIR")
        }
        return store
    }

    func checkpointSave(_ p: Params) throws -> Any {
        let store = try checkpointStore()
        try p.only(["name"])
        let name = try p.string("name")
        try store.save(name) { folder in
            try model.save(to: folder)
            try trainer.saveState(to: folder)
            try saveAdapters(into: folder)
        }
        return ["name": name, "weights_version": trainer.weightsVersion]
    }

    func checkpointLoad(_ p: Params) throws -> Any {
        let store = try checkpointStore()
        try p.only(["name"])
        let name = try p.string("name")
        let folder = try store.folder(name)
        // Validate everything before touching the live weights.
        let staged = try TransformerModel.load(directory: folder)
        guard staged.parameters.count == model.parameters.count, staged.configJSON == model.configJSON else {
            throw RPCError.invalidParams(path: "params.name", "checkpoint '\(name)' holds a different model")
        }
        let adapters = try stageAdapters(from: folder)
        try trainer.loadState(from: folder, weights: staged)
        replaceAdapters(with: adapters)
        // Every rank of a data-parallel trainer takes the loaded state.
        // (A degraded trainer loads for sampling alone: its ranks are gone.)
        if let world = configuration.ranks, world.failure == nil { try RankCommands.sendState(world, trainer: trainer) }
        return ["name": name, "weights_version": trainer.weightsVersion]
    }
}
