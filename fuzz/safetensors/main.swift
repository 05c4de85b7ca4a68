// safetensors headers and tensor ranges: the input is written as a file, opened, and every tensor
// it declares is read as floats (validation must reject whatever does not fit the file).
import Foundation
import FuzzCommon
import Weights

let path = "/dev/shm/ember-fuzz-\(getpid()).safetensors"

runFuzzer { data, size in
    let d = Data(bytes: data!, count: size)
    guard FileManager.default.createFile(atPath: path, contents: d) else { return 0 }
    if let file = try? SafetensorsFile(path: path) {
        for name in file.tensors.keys.prefix(8) where (file.tensors[name]?.elementCount ?? 0) <= 1 << 20 {
            _ = try? file.floats(name)
        }
    }
    return 0
}
