// Loss modes, the options each accepts and their defaults, in one table. The engine's option
// structs take their defaults from it, the server parses train_step's `loss` against it and
// reports it in server.info (`loss_defaults`), and clients read it from there.
import Foundation

/// A loss option's default: a number, a name, a flag, or no default (the option is off unless given).
public enum LossDefault: Sendable, Equatable {
    case number(Double)
    case text(String)
    case flag(Bool)
    case unset

    public var json: Any {
        switch self {
        case let .number(x): x
        case let .text(s): s
        case let .flag(b): b
        case .unset: NSNull()
        }
    }
}

/// Loss modes, the options each accepts, and their defaults (the paper's recipe where it has one;
/// docs/lp-reg.md states every loss).
public enum LossDefaults {
    /// Options of every mode.
    public static let common: [(String, LossDefault)] = [
        ("agg", .text("token-mean")), ("temperature", .number(1)), ("entropy_coef", .number(0)),
        ("kl_coef", .number(0)), ("kl_type", .text("k3")),
    ]
    static func clip(_ low: Double, _ high: Double) -> [(String, LossDefault)] {
        [("eps_low", .number(low)), ("eps_high", .number(high)), ("dual_clip", .unset)]
    }
    /// Per mode, in the protocol's order.
    public static let modes: [(String, [(String, LossDefault)])] = [
        ("lp_reg", clip(1.0, 9.0) + [("min_p", .number(0.02)), ("threshold", .unset), ("rho", .number(0.01)),
                                     ("rho_pos", .number(0)), ("beta", .number(1)), ("kl", .text("k3")),
                                     ("selection", .text("batch")), ("percentile_over", .text("negative")),
                                     ("skip_k_le_1", .flag(true))]),
        ("ppo", clip(0.2, 0.2)),
        ("gspo", clip(0.0003, 0.0004)),
        ("clip_cov", clip(0.2, 0.2) + [("ratio", .number(0.0002)), ("cov_low", .number(1)), ("cov_high", .number(5))]),
        ("kl_cov", [("ratio", .number(0.0002)), ("coef", .number(1))]),
        ("high_entropy", clip(0.2, 0.2) + [("fraction", .number(0.2))]),
        ("cispo", clip(1.0, 0.2)),
        ("cross_entropy", []),
    ]

    public static var modeNames: [String] { modes.map(\.0) }

    /// The options `mode` accepts (its own and the common ones) with their defaults; a name that
    /// is no mode (the accessors below use "common") gets the common ones only.
    public static func options(_ mode: String) -> [String: LossDefault] {
        var d = Dictionary(uniqueKeysWithValues: common)
        for (k, v) in modes.first(where: { $0.0 == mode })?.1 ?? [] { d[k] = v }
        return d
    }

    /// `{"common": {...}, "modes": {mode: {...}}}` as server.info reports it.
    public static var json: [String: Any] {
        ["common": Dictionary(uniqueKeysWithValues: common.map { ($0.0, $0.1.json) }),
         "modes": Dictionary(uniqueKeysWithValues: modes.map { m in (m.0, Dictionary(uniqueKeysWithValues: m.1.map { ($0.0, $0.1.json) })) })]
    }
}

extension LossDefaults {
    /// A numeric default of the table (the engine's option structs take theirs from here).
    public static func number(_ mode: String, _ key: String) -> Float {
        guard case let .number(x)? = options(mode)[key] else { preconditionFailure("no numeric default \(mode).\(key)") }
        return Float(x)
    }
    public static func text(_ mode: String, _ key: String) -> String {
        guard case let .text(s)? = options(mode)[key] else { preconditionFailure("no default name \(mode).\(key)") }
        return s
    }
    public static func flag(_ mode: String, _ key: String) -> Bool {
        guard case let .flag(b)? = options(mode)[key] else { preconditionFailure("no default flag \(mode).\(key)") }
        return b
    }
    public static func clip(_ mode: String) -> ClipOptions {
        ClipOptions(epsLow: number(mode, "eps_low"), epsHigh: number(mode, "eps_high"))
    }
}
