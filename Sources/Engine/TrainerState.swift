// The trainer's part of a checkpoint: AdamW's moments, the optimizer settings and the counters,
// saved beside the weights so a resumed run continues exactly.
import Foundation
import Models
import Weights

extension Trainer {
    /// Writes AdamW's moments (`optimizer.safetensors`, flat F32 in the parameter layout) and the
    /// counters and settings (`trainer_state.json`) into `directory`, so a resumed run continues
    /// exactly.
    public func saveState(to directory: String) throws {
        let store = trainable
        let n = store.count
        let m = UnsafeBufferPointer(start: store.firstMoment, count: n)
        let v = UnsafeBufferPointer(start: store.secondMoment, count: n)
        try SafetensorsWriter.write([TensorToWrite(name: "exp_avg", shape: [n], data: m),
                                     TensorToWrite(name: "exp_avg_sq", shape: [n], data: v)],
                                    dtype: .f32, to: directory + "/optimizer.safetensors")
        let s = optimizer.settings
        let state: [String: Any] = [
            "optimizer_steps": optimizer.stepCount, "weights_version": weightsVersion,
            "lr": s.lr, "beta1": s.beta1, "beta2": s.beta2, "eps": s.eps, "weight_decay": s.weightDecay,
            "grad_clip": s.gradClip, "parameter_count": n,
        ]
        let data = try JSONSerialization.data(withJSONObject: state, options: [.prettyPrinted, .sortedKeys])
        try data.write(to: URL(fileURLWithPath: directory + "/trainer_state.json"))
    }

    /// Restores a checkpoint: `weights` (loaded and checked from the same folder) and what
    /// `saveState` wrote. Everything is read and checked first; the live weights, moments,
    /// settings and counters change only once nothing can fail.
    public func loadState(from directory: String, weights: TransformerModel) throws {
        try loadState(from: directory, values: weights.parameters)
    }

    /// As `loadState(from:weights:)` with the trainable weights as a parameter store of the
    /// trainer's layout (an adapter's, when it trains one).
    public func loadState(from directory: String, values weights: ParameterStore) throws {
        let path = directory + "/trainer_state.json"
        guard let data = FileManager.default.contents(atPath: path),
              let s = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any],
              let steps = s["optimizer_steps"] as? Int, let version = s["weights_version"] as? Int,
              let count = s["parameter_count"] as? Int else {
            throw TrainError.invalid(path: path, reason: "missing or malformed trainer state")
        }
        let store = trainable
        guard count == store.count, weights.count == store.count else {
            throw TrainError.invalid(path: path, reason: "optimizer state has \(count) parameters, the model \(store.count)")
        }
        let file = try SafetensorsFile(path: directory + "/optimizer.safetensors")
        var m = [Float](repeating: 0, count: count), v = [Float](repeating: 0, count: count)
        try m.withUnsafeMutableBufferPointer { try file.read("exp_avg", shape: [count], into: $0.baseAddress!) }
        try v.withUnsafeMutableBufferPointer { try file.read("exp_avg_sq", shape: [count], into: $0.baseAddress!) }
        func f(_ k: String) -> Float? { (s[k] as? Double).map(Float.init) }
        var settings = optimizer.settings
        if let lr = f("lr"), let b1 = f("beta1"), let b2 = f("beta2"), let eps = f("eps"), let wd = f("weight_decay"),
           let clip = f("grad_clip") {
            settings = AdamWSettings(lr: lr, beta1: b1, beta2: b2, eps: eps, weightDecay: wd, gradClip: clip)
        }
        // Commit.
        store.assign(from: weights.values)
        m.withUnsafeBufferPointer { store.firstMoment.update(from: $0.baseAddress!, count: count) }
        v.withUnsafeBufferPointer { store.secondMoment.update(from: $0.baseAddress!, count: count) }
        optimizer.settings = settings
        optimizer.restore(stepCount: steps)
        weightsVersion = version
    }
}
