// LoRA adapters: create, list, delete, load (PEFT folders), save, merge, and the `adapter`
// parameter every sampling and training method takes. Each adapter has its own Trainer (AdamW
// state, schedule, weights version, reference); the base model is shared and frozen under them.
import Engine
import Foundation
import Models
import Weights

extension Dispatcher {
    /// The trainer a call addresses: its `adapter` parameter's, or the base model's.
    func trainer(for p: Params) throws -> Trainer {
        guard p.has("adapter") else { return trainer }
        return try adapterTrainer(try p.string("adapter"), path: "params.adapter")
    }

    func adapterTrainer(_ name: String, path: String) throws -> Trainer {
        guard let t = adapterTrainers[name] else {
            throw RPCError(.unknownAdapter, path: path,
                           hint: "no adapter named '\(name)'" + (adapterOrder.isEmpty ? "; create one with adapters.create or adapters.load"
                                                                : "; adapters.list shows \(adapterOrder.prefix(8).joined(separator: ", "))"))
        }
        return t
    }

    /// The adapter object of `name` (nil for nil), for the generator and scoring.
    func adapterObject(_ name: String?, path: String) throws -> LoRAAdapter? {
        try name.map { try adapterTrainer($0, path: path).adapter! }
    }

    /// The adapter held under `name`, if any.
    public func adapter(named name: String) -> LoRAAdapter? { adapterTrainers[name]?.adapter }

    /// Names served by /v1/models besides the base model, in creation order.
    public var adapterNames: [String] { adapterOrder }

    func adapterInfo(_ t: Trainer) -> [String: Any] {
        let a = t.adapter!, o = a.options
        return ["name": a.name, "rank": o.rank, "alpha": o.alpha, "use_rslora": o.useRSLoRA, "target_modules": o.targetModules,
                "modules": a.sites.count, "parameters": a.parameterCount, "weights_version": t.weightsVersion,
                "optimizer_steps": t.optimizer.stepCount]
    }

    func checkNewName(_ name: String) throws {
        do { try CheckpointStore.validate(name: name) } catch {
            throw RPCError.invalidParams(path: "params.name", "adapter name '\(name)': \(CheckpointStore.nameRule)")
        }
        guard adapterTrainers[name] == nil else {
            throw RPCError(.adapterExists, path: "params.name", hint: "an adapter named '\(name)' exists; delete it first or pick another name")
        }
        guard adapterTrainers.count < configuration.maxAdapters else {
            throw RPCError(.overloaded, path: "params.name",
                           hint: "this server holds at most \(configuration.maxAdapters) adapters (--max-adapters); delete one first")
        }
    }

    func register(_ adapter: LoRAAdapter, name: String) -> Trainer {
        adapter.name = name
        let t = Trainer(model: model, adapter: adapter)
        adapterTrainers[name] = t
        adapterOrder.append(name)
        return t
    }

    func adaptersCreate(_ p: Params) throws -> Any {
        try p.only(["name", "rank", "alpha", "target_modules", "seed", "use_rslora"])
        let name = try p.string("name")
        try checkNewName(name)
        let rank = try p.int("rank", min: 1)
        var targets = ["all-linear"]
        if p.object["target_modules"] is String { targets = [try p.string("target_modules")] }
        else if p.has("target_modules") { targets = try p.strings("target_modules") }
        let options = LoRAOptions(rank: rank, alpha: try p.float("alpha", Float(rank), min: 0), targetModules: targets,
                                  useRSLoRA: try p.bool("use_rslora", false))
        let adapter = try LoRAAdapter(model: model, options: options, seed: UInt64(try p.int("seed", 0, min: 0)))
        return adapterInfo(register(adapter, name: name))
    }

    func adaptersDelete(_ p: Params) throws -> Any {
        try p.only(["name"])
        let name = try p.string("name")
        _ = try adapterTrainer(name, path: "params.name")
        // Requests already running keep their reference and finish under it.
        adapterTrainers[name] = nil
        adapterOrder.removeAll { $0 == name }
        return ["deleted": name]
    }

    /// `path` resolved (symbolic links too) inside the checkpoint directory or an --adapter-dir.
    func confinedAdapterPath(_ raw: String) throws -> String {
        var roots = configuration.adapterDirectories
        if let c = configuration.checkpoints { roots.insert(c.directory, at: 0) }
        guard !roots.isEmpty else {
            throw RPCError(.checkpointsDisabled, path: "params.path",
                           hint: "adapters load from the checkpoint directory or an --adapter-dir; start the server with one of them")
        }
        let joined = raw.hasPrefix("/") ? raw : roots[0] + "/" + raw
        let real = URL(fileURLWithPath: joined).resolvingSymlinksInPath().standardizedFileURL.path
        for root in roots {
            let r = URL(fileURLWithPath: root).resolvingSymlinksInPath().standardizedFileURL.path
            if real == r || real.hasPrefix(r.hasSuffix("/") ? r : r + "/") { return real }
        }
        throw RPCError.invalidParams(path: "params.path",
                                     "'\(raw)' is outside the folders adapters may load from (\(roots.joined(separator: ", "))); "
                                        + "a relative path is read from \(roots[0])")
    }

    func adaptersLoad(_ p: Params) throws -> Any {
        try p.only(["name", "path"])
        let name = try p.string("name")
        try checkNewName(name)
        let folder = try confinedAdapterPath(try p.string("path"))
        let adapter: LoRAAdapter
        do { adapter = try LoRAAdapter.load(directory: folder, model: model) } catch let LoRAError.invalid(path, reason) {
            throw RPCError.invalidParams(path: "params.path", "\(path): \(reason)")
        }
        return adapterInfo(register(adapter, name: name))
    }

    /// The store of saved adapters: `<checkpoint-dir>/adapters/<name>`.
    func adapterStore() throws -> CheckpointStore {
        try CheckpointStore.open(directory: try checkpointStore().directory + "/adapters")
    }

    func adaptersSave(_ p: Params) throws -> Any {
        try p.only(["name"])
        let name = try p.string("name")
        let t = try adapterTrainer(name, path: "params.name")
        let store = try adapterStore()
        try store.save(name) { folder in try t.adapter!.save(to: folder, model: model, baseModelPath: configuration.modelDirectory) }
        return ["name": name, "path": store.directory + "/" + name, "weights_version": t.weightsVersion]
    }

    func adaptersMerge(_ p: Params) throws -> Any {
        try p.only(["name", "checkpoint"])
        let name = try p.string("name")
        let t = try adapterTrainer(name, path: "params.name")
        let checkpoint = try p.string("checkpoint")
        let store = try checkpointStore()
        do { try CheckpointStore.validate(name: checkpoint) } catch {
            throw RPCError.invalidParams(path: "params.checkpoint", "\(CheckpointStore.nameRule)")
        }
        let merged = try t.adapter!.merged(into: model)
        try store.save(checkpoint) { folder in
            try merged.save(to: folder)
            // A servable folder: the base model's tokenizer files beside the merged weights.
            if let dir = configuration.modelDirectory {
                for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"]
                where FileManager.default.fileExists(atPath: dir + "/" + f) {
                    try FileManager.default.copyItem(atPath: dir + "/" + f, toPath: folder + "/" + f)
                }
            }
        }
        return ["name": name, "checkpoint": checkpoint, "path": store.directory + "/" + checkpoint]
    }

    // MARK: - In checkpoints

    /// checkpoint.save: every adapter under `adapters/<name>/` (PEFT files plus its trainer state).
    func saveAdapters(into folder: String) throws {
        guard !adapterOrder.isEmpty else { return }
        var order: [String] = []
        for name in adapterOrder {
            let t = adapterTrainers[name]!, dir = folder + "/adapters/" + name
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            try t.adapter!.save(to: dir, model: model, baseModelPath: configuration.modelDirectory)
            try t.saveState(to: dir)
            order.append(name)
        }
        try JSONSerialization.data(withJSONObject: order).write(to: URL(fileURLWithPath: folder + "/adapters/order.json"))
    }

    /// checkpoint.load, first half: the checkpoint's adapters read and checked, nothing changed.
    func stageAdapters(from folder: String) throws -> [(String, Trainer)] {
        let path = folder + "/adapters/order.json"
        guard let data = FileManager.default.contents(atPath: path) else { return [] }
        guard let names = (try? JSONSerialization.jsonObject(with: data)) as? [String] else {
            throw RPCError.invalidParams(path: "params.name", "\(path) is malformed")
        }
        return try names.map { name in
            let dir = folder + "/adapters/" + name
            let adapter = try LoRAAdapter.load(directory: dir, model: model)
            adapter.name = name
            let t = Trainer(model: model, adapter: adapter)
            try t.loadState(from: dir, values: adapter.parameters)
            return (name, t)
        }
    }

    /// checkpoint.load, second half: the adapters become exactly the checkpoint's.
    func replaceAdapters(with staged: [(String, Trainer)]) {
        adapterTrainers = Dictionary(uniqueKeysWithValues: staged)
        adapterOrder = staged.map(\.0)
    }
}
