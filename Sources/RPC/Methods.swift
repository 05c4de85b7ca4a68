// The protocol's methods in one table: for each, how the scheduler runs it, whether
// `--read-only` refuses it, whether a client may resend it after a dropped connection, and
// whether its request or result can be megabytes. The dispatcher, the scheduler, the router and
// the read-only check read this table; Protocol/openrpc.json carries the same traits under
// `x-ember` (scripts/make_openrpc.py writes them from `ember-server --protocol`, and a test
// compares), and the Python client's retry set is generated from that file.
import Engine

/// How the scheduler runs a method.
public enum Scheduling: String, Sendable, CaseIterable {
    /// Answered on the I/O side from published state, without waiting for the compute thread.
    case loop
    /// Queued on the compute thread and batched with other clients' calls: `generate` joins the
    /// continuous batch, `logprob` calls share one packed forward pass.
    case batched
    /// Runs on the compute thread at the next pass, whatever is queued (reads state only).
    case read
    /// Runs alone at a step boundary, after every call queued before it, and holds back the calls
    /// behind it: no sample spans the change it makes.
    case exclusive
    /// Acts on the scheduler's own queues (`cancel`).
    case control
    /// Answered by a replica's weight follower (`--follow`), off the compute thread; a server
    /// that follows nothing refuses it (`not_a_replica`).
    case follower
}

/// One method of the protocol.
public enum RPCMethod: String, CaseIterable, Sendable {
    case serverInfo = "server.info"
    case tokenize
    case detokenize
    case chatRender = "chat.render"
    case generate
    case logprob
    case trainStep = "train_step"
    case optimizerConfigure = "optimizer.configure"
    case referenceSnapshot = "reference.snapshot"
    case rolloutsRelease = "rollouts.release"
    case checkpointSave = "checkpoint.save"
    case checkpointLoad = "checkpoint.load"
    case checkpointList = "checkpoint.list"
    case adaptersCreate = "adapters.create"
    case adaptersList = "adapters.list"
    case adaptersDelete = "adapters.delete"
    case adaptersLoad = "adapters.load"
    case adaptersSave = "adapters.save"
    case adaptersMerge = "adapters.merge"
    case weightsSync = "weights.sync"
    case cancel

    public struct Traits: Sendable, Equatable {
        public let scheduling: Scheduling
        /// Changes the weights, the optimizer, the reference policy or saved checkpoints:
        /// refused by `--read-only`.
        public let mutates: Bool
        /// Changes nothing, so a client may send it again after a dropped connection.
        public let retrySafe: Bool
        /// Its request or result may be megabytes: the answer is encoded off the compute thread.
        public let largeBodies: Bool
    }

    /// The table.
    public var traits: Traits {
        switch self {
        case .serverInfo: Traits(scheduling: .loop, mutates: false, retrySafe: true, largeBodies: false)
        case .tokenize, .detokenize, .chatRender: Traits(scheduling: .read, mutates: false, retrySafe: true, largeBodies: true)
        case .generate: Traits(scheduling: .batched, mutates: false, retrySafe: false, largeBodies: true)
        case .logprob: Traits(scheduling: .batched, mutates: false, retrySafe: true, largeBodies: true)
        case .trainStep: Traits(scheduling: .exclusive, mutates: true, retrySafe: false, largeBodies: true)
        case .optimizerConfigure, .referenceSnapshot, .checkpointSave, .checkpointLoad:
            Traits(scheduling: .exclusive, mutates: true, retrySafe: false, largeBodies: false)
        // Ordered with train_step (a release sent after a step that uses the rollouts must not
        // overtake it), but it frees sampling memory only: a read-only replica's clients release
        // the rollouts they generated.
        case .rolloutsRelease: Traits(scheduling: .exclusive, mutates: false, retrySafe: false, largeBodies: false)
        case .checkpointList, .adaptersList: Traits(scheduling: .read, mutates: false, retrySafe: true, largeBodies: false)
        // Adapters change what generate and train_step mean: at a step boundary, refused by
        // --read-only (save writes files, as checkpoint.save does).
        case .adaptersCreate, .adaptersDelete, .adaptersLoad, .adaptersSave, .adaptersMerge:
            Traits(scheduling: .exclusive, mutates: true, retrySafe: false, largeBodies: false)
        // A replica follows its trainer (it is read-only to its clients): pulling the trainer's
        // current version again changes nothing, so a client may resend it.
        case .weightsSync: Traits(scheduling: .follower, mutates: false, retrySafe: true, largeBodies: false)
        case .cancel: Traits(scheduling: .control, mutates: false, retrySafe: false, largeBodies: false)
        }
    }

    public var name: String { rawValue }

    /// The method named `name`, or `method_not_found`.
    public static func named(_ name: String) throws -> RPCMethod {
        guard let m = RPCMethod(rawValue: name) else { throw RPCError.methodNotFound(name) }
        return m
    }

    /// Every method's name, in table order (`server.info`'s `capabilities`).
    public static var names: [String] { allCases.map(\.rawValue) }

    /// The tables as JSON (`ember-server --protocol`; scripts/make_openrpc.py writes them into the
    /// spec and the Python client): methods, errors, loss defaults and the version.
    public static func describe() -> [String: Any] {
        ["version": EmberVersion.string, "loss_defaults": LossDefaults.json,
         "methods": allCases.map { m -> [String: Any] in
            let t = m.traits
            return ["name": m.rawValue, "scheduling": t.scheduling.rawValue, "mutates": t.mutates,
                    "retry_safe": t.retrySafe, "large_bodies": t.largeBodies]
        },
         "errors": ErrorKind.allCases.map { k -> [String: Any] in
             ["kind": k.rawValue, "code": k.code, "message": k.message, "http_status": k.httpStatus]
         }]
    }
}
