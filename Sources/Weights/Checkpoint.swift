// A Hugging Face model folder's weights: `model.safetensors`, or shards listed in
// `model.safetensors.index.json` ({"weight_map": {tensor: file}}).
import Foundation

/// Read access to every tensor of a model folder, whichever file holds it.
public final class CheckpointReader {
    public let directory: String
    private var files: [String: SafetensorsFile] = [:]
    private var location: [String: String] = [:]   // tensor -> file name

    public init(directory: String) throws {
        self.directory = directory
        let fm = FileManager.default
        let single = directory + "/model.safetensors"
        let index = directory + "/model.safetensors.index.json"
        if fm.fileExists(atPath: single) {
            let f = try SafetensorsFile(path: single)
            files["model.safetensors"] = f
            for name in f.tensors.keys { location[name] = "model.safetensors" }
        } else if fm.fileExists(atPath: index) {
            guard let data = fm.contents(atPath: index),
                  let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
                  let map = json["weight_map"] as? [String: String] else {
                throw WeightsError.malformedHeader(path: index, reason: "no weight_map object of tensor -> file")
            }
            for (tensor, file) in map {
                guard !file.contains("/"), !file.hasPrefix(".") else {
                    throw WeightsError.malformedHeader(path: index, reason: "shard name '\(file)' leaves the folder")
                }
                if files[file] == nil { files[file] = try SafetensorsFile(path: directory + "/" + file) }
                guard files[file]!.tensors[tensor] != nil else {
                    throw WeightsError.missingTensor(tensor: tensor, searched: directory + "/" + file + " (listed in the index)")
                }
                location[tensor] = file
            }
        } else {
            throw WeightsError.cannotOpen(path: directory, reason: "neither model.safetensors nor model.safetensors.index.json exists")
        }
    }

    /// Every tensor name in the checkpoint.
    public var tensorNames: [String] { location.keys.sorted() }

    public func contains(_ name: String) -> Bool { location[name] != nil }

    public func info(_ name: String) throws -> TensorInfo {
        guard let f = location[name], let file = files[f] else {
            throw WeightsError.missingTensor(tensor: name, searched: directory)
        }
        return try file.info(name)
    }

    /// Reads tensor `name` (shape checked) into `out` as Float.
    public func read(_ name: String, shape: [Int], into out: UnsafeMutablePointer<Float>) throws {
        guard let f = location[name], let file = files[f] else {
            throw WeightsError.missingTensor(tensor: name, searched: directory)
        }
        try file.read(name, shape: shape, into: out)
    }
}

public enum CheckpointWriter {
    /// Writes tensors into `directory` as `model.safetensors`, or, when their total size exceeds
    /// `maxShardBytes`, as `model-0000i-of-0000n.safetensors` shards plus the index file.
    public static func write(_ tensors: [TensorToWrite], dtype: DType, to directory: String,
                             maxShardBytes: Int = 4 << 30) throws {
        var shards: [[TensorToWrite]] = [[]]
        var size = 0
        for t in tensors {
            let bytes = t.data.count * dtype.byteSize
            if size > 0 && size + bytes > maxShardBytes {
                shards.append([]); size = 0
            }
            shards[shards.count - 1].append(t)
            size += bytes
        }
        if shards.count == 1 {
            try SafetensorsWriter.write(tensors, dtype: dtype, to: directory + "/model.safetensors")
            return
        }
        var weightMap: [String: String] = [:]
        var total = 0
        for (i, shard) in shards.enumerated() {
            let name = String(format: "model-%05d-of-%05d.safetensors", i + 1, shards.count)
            try SafetensorsWriter.write(shard, dtype: dtype, to: directory + "/" + name)
            for t in shard { weightMap[t.name] = name; total += t.data.count * dtype.byteSize }
        }
        let index: [String: Any] = ["metadata": ["total_size": total], "weight_map": weightMap]
        let data = try JSONSerialization.data(withJSONObject: index, options: [.prettyPrinted, .sortedKeys])
        guard FileManager.default.createFile(atPath: directory + "/model.safetensors.index.json", contents: data) else {
            throw WeightsError.writeFailed(path: directory + "/model.safetensors.index.json", reason: "create failed")
        }
    }
}
