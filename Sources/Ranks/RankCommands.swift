// What rank 0 tells the other ranks, and the other ranks' loop. Rank 0 loads the model, serves
// the RPC and owns everything that is not training (sampling, the rollout store, checkpoints on
// disk); the other ranks hold a copy of the trainable state and run each train_step (`Trainer.run`) on
// the same command. They need no model folder: rank 0 sends config.json and the weights.
//
//   init   config.json and the weights (once, at start)
//   state  weights, AdamW moments, counters, settings and schedule (after checkpoint.load)
//   train  a TrainCommand (every train_step on the base weights)
//   snapshot  freeze the current weights as the KL reference (reference.snapshot)
//   stop   leave (rank 0 is shutting down)
import Engine
import Foundation
import Models
import Weights

public enum RankCommands {
    enum Op: UInt8 { case initialize = 1, state = 2, train = 3, stop = 4, snapshot = 5 }

    static func message(_ op: Op, _ json: [String: Any]) throws -> Data {
        Data([op.rawValue]) + (try JSONSerialization.data(withJSONObject: json))
    }

    /// Rank 0, at start: the model every rank trains.
    public static func sendInit(_ world: MPIWorld, model: TransformerModel) throws {
        let p = model.parameters
        let json: [String: Any] = ["config": String(decoding: model.configJSON, as: UTF8.self), "bf16": p.storage == .bf16,
                                   "count": p.count, "segment": world.segment]
        try world.send(command: try message(.initialize, json), arrays: [(UnsafePointer(p.precise), p.count)])
    }

    /// Rank 0, after its trainer's state changed other than by a step (checkpoint.load).
    public static func sendState(_ world: MPIWorld, trainer: Trainer) throws {
        let p = trainer.model.parameters
        let settings = try JSONEncoder().encode(trainer.optimizer.settings)
        let schedule = try JSONEncoder().encode(trainer.schedule)
        let json: [String: Any] = ["optimizer_steps": trainer.optimizer.stepCount, "weights_version": trainer.weightsVersion,
                                   "settings": String(decoding: settings, as: UTF8.self),
                                   "schedule": String(decoding: schedule, as: UTF8.self), "count": p.count]
        try world.send(command: try message(.state, json),
                       arrays: [(UnsafePointer(p.precise), p.count), (UnsafePointer(p.firstMoment), p.count),
                                (UnsafePointer(p.secondMoment), p.count)])
    }

    /// Rank 0, for each train_step on the base weights (before its own `run`).
    public static func sendTrain(_ world: MPIWorld, _ command: TrainCommand) throws {
        try world.send(command: Data([Op.train.rawValue]) + (try command.encoded()), arrays: [])
    }

    /// Rank 0, after reference.snapshot on the base weights: every rank freezes the same weights,
    /// so the ranks can score the KL reference together.
    public static func sendSnapshot(_ world: MPIWorld) throws {
        try world.send(command: Data([Op.snapshot.rawValue]), arrays: [])
    }

    /// Rank 0, shutting down: the other ranks leave.
    public static func sendStop(_ world: MPIWorld) {
        try? world.send(command: Data([Op.stop.rawValue]), arrays: [], limit: 5)
    }

    /// The other ranks: follow rank 0's commands until it stops the job (0) or the world fails (1).
    public static func runWorker(_ world: MPIWorld, microBatches: Int, log: (String) -> Void) -> Int32 {
        var trainer: Trainer?
        do {
            while true {
                let data = try world.receiveCommand()
                guard let first = data.first, let op = Op(rawValue: first) else { throw RankFailure(reason: "rank 0 sent an unknown command") }
                let body = data.dropFirst()
                switch op {
                case .stop:
                    world.finish()
                    return 0
                case .initialize:
                    let j = try object(body)
                    guard let config = j["config"] as? String, let count = j["count"] as? Int, let segment = j["segment"] as? Int, segment > 0 else {
                        throw RankFailure(reason: "bad init command")
                    }
                    world.segment = segment
                    let model = try TransformerModel(config: Data(config.utf8))
                    guard model.parameters.count == count else {
                        throw RankFailure(reason: "rank 0's model has \(count) parameters, this rank built \(model.parameters.count)")
                    }
                    if j["bf16"] as? Bool == true { model.parameters.useBF16(keepMaster: true) }
                    let staging = UnsafeMutablePointer<Float>.allocate(capacity: max(1, count))
                    defer { staging.deallocate() }
                    try world.receive(into: staging, count: count)
                    model.parameters.assign(from: staging)
                    let t = Trainer(model: model)
                    t.group = world
                    t.dataParallelMicroBatches = microBatches
                    trainer = t
                    log("rank \(world.rank): holding \(count) parameters")
                case .state:
                    guard let t = trainer else { throw RankFailure(reason: "state before init") }
                    let j = try object(body)
                    let p = t.model.parameters
                    guard let steps = j["optimizer_steps"] as? Int, let version = j["weights_version"] as? Int,
                          let settings = j["settings"] as? String, let schedule = j["schedule"] as? String,
                          j["count"] as? Int == p.count else { throw RankFailure(reason: "bad state command") }
                    let staging = UnsafeMutablePointer<Float>.allocate(capacity: max(1, p.count))
                    defer { staging.deallocate() }
                    try world.receive(into: staging, count: p.count)
                    try world.receive(into: p.firstMoment, count: p.count)
                    try world.receive(into: p.secondMoment, count: p.count)
                    p.assign(from: staging)
                    t.configure(try JSONDecoder().decode(AdamWSettings.self, from: Data(settings.utf8)),
                                schedule: try JSONDecoder().decode(LRSchedule.self, from: Data(schedule.utf8)))
                    t.optimizer.restore(stepCount: steps)
                    t.adopt(weightsVersion: version)
                case .snapshot:
                    guard let t = trainer else { throw RankFailure(reason: "snapshot before init") }
                    try t.snapshotReference()
                case .train:
                    guard let t = trainer else { throw RankFailure(reason: "train before init") }
                    let command = try TrainCommand.decode(Data(body))
                    guard command.weightsVersion == t.weightsVersion, command.optimizerSteps == t.optimizer.stepCount else {
                        throw RankFailure(reason: "rank \(world.rank) is at weights version \(t.weightsVersion) (optimizer step \(t.optimizer.stepCount)), rank 0 at \(command.weightsVersion) (\(command.optimizerSteps)): the ranks are out of step")
                    }
                    do {
                        _ = try t.run(command)
                    } catch let e as NonFiniteError {
                        // Every rank refused the same step (the ranks agreed on it).
                        log("rank \(world.rank): step refused: \(e)")
                    } catch let e as TrainError {
                        log("rank \(world.rank): step refused: \(e)")
                    }
                }
            }
        } catch {
            let reason = (error as? RankFailure)?.reason ?? "\(error)"
            world.fail(reason)
            log("rank \(world.rank): leaving: \(reason)")
            return 1
        }
    }

    static func object(_ body: Data.SubSequence) throws -> [String: Any] {
        guard let j = try JSONSerialization.jsonObject(with: Data(body)) as? [String: Any] else {
            throw RankFailure(reason: "rank 0 sent a malformed command")
        }
        return j
    }
}
