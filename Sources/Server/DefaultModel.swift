// Where the embedded default model lives: `EMBER_DEFAULT_MODEL`, else beside the executable
// (`ember-default-model/`, as the container installs it), else `share/ember/default-model` under
// the executable's prefix, else the source tree's `models/ember-default` found by walking up from
// the executable (a `swift build` inside the repository).
import Foundation

public enum DefaultModel {
    public static func candidates() -> [String] {
        var out: [String] = []
        if let env = ProcessInfo.processInfo.environment["EMBER_DEFAULT_MODEL"] { out.append(env) }
        let exe = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
        out.append(exe.appendingPathComponent("ember-default-model").path)
        out.append(exe.deletingLastPathComponent().appendingPathComponent("share/ember/default-model").path)
        var dir = exe
        for _ in 0..<6 {
            out.append(dir.appendingPathComponent("models/ember-default").path)
            dir = dir.deletingLastPathComponent()
        }
        return out
    }

    public static func locate() -> String? {
        candidates().first { FileManager.default.fileExists(atPath: $0 + "/config.json") }
    }
}
