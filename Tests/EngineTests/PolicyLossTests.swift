// Policy losses against an independent PyTorch implementation (scripts/make_loss_fixtures.py),
// every mode (ppo, lp_reg, gspo, cispo, clip_cov, kl_cov, high_entropy, cross_entropy) plus the
// entropy bonus and reference KL (k1, k2, k3):
// the loss value, the Lp-Reg selection and d(loss)/d(logits) by autograd, for PPO (clip-higher,
// dual clip), Lp-Reg (both percentile semantics, positive-side rho, the k <= 1 quirk on and
// off) and cross-entropy, under every aggregation mode.
import Engine
import Foundation
import Kernels
import TestSupport
import XCTest

final class PolicyLossTests: XCTestCase {
    func testLossesMatchPyTorchAutograd() throws {
        let data = FileManager.default.contents(atPath: fixturesDirectory + "/losses/cases.json")!
        let cases = try JSONSerialization.jsonObject(with: data) as! [[String: Any]]
        XCTAssertGreaterThanOrEqual(cases.count, 24)
        for (n, c) in cases.enumerated() {
            let o = c["options"] as! [String: Any]
            func f(_ k: String) -> Float { Float(o[k] as! Double) }
            let mode: LossMode
            switch c["mode"] as! String {
            case "ppo":
                mode = .ppo(ClipOptions(epsLow: f("eps_low"), epsHigh: f("eps_high"),
                                        dualClip: (o["dual_clip"] as? Double).map(Float.init)))
            case "lp_reg":
                var l = LpRegOptions()
                l.clip = ClipOptions(epsLow: f("eps_low"), epsHigh: f("eps_high"))
                l.rho = f("rho"); l.rhoPos = f("rho_pos"); l.beta = f("beta")
                l.percentileOver = LpRegOptions.PercentileOver(rawValue: o["percentile_over"] as! String)!
                l.skipWhenKAtMostOne = o["quirk"] as! Bool
                l.proxy = .minP(f("kappa"))
                l.kl = (o["kl"] as? String) == "full" ? .full : .k3
                mode = .lpReg(l)
            case "gspo":
                mode = .gspo(ClipOptions(epsLow: f("eps_low"), epsHigh: f("eps_high")))
            case "cispo":
                mode = .cispo(ClipOptions(epsLow: f("eps_low"), epsHigh: f("eps_high")))
            case "clip_cov":
                var cc = ClipCovOptions()
                cc.clip = ClipOptions(epsLow: f("eps_low"), epsHigh: f("eps_high"))
                cc.ratio = f("ratio"); cc.covLow = f("cov_low"); cc.covHigh = f("cov_high")
                mode = .clipCov(cc)
            case "kl_cov":
                var kc = KLCovOptions()
                kc.ratio = f("ratio"); kc.coef = f("coef")
                mode = .klCov(kc)
            case "high_entropy":
                mode = .highEntropy(fraction: f("fraction"), clip: ClipOptions(epsLow: f("eps_low"), epsHigh: f("eps_high")))
            default:
                mode = .crossEntropy
            }
            var config = LossConfig(mode: mode)
            config.aggregation = Aggregation(rawValue: c["aggregation"] as! String)!
            config.temperature = Float(c["temperature"] as! Double)
            config.entropyCoef = Float(o["entropy_coef"] as? Double ?? 0)
            config.klCoef = Float(o["kl_coef"] as? Double ?? 0)
            config.klType = ReferenceKL(rawValue: o["kl_type"] as? String ?? "k3")!
            let V = c["vocab"] as! Int
            let T = Float(c["temperature"] as! Double)
            var logits = (c["logits"] as! [Double]).map(Float.init)
            let tokens = PolicyTokens(
                sequence: c["sequence"] as! [Int], targets: (c["targets"] as! [Int]).map(Int32.init),
                advantages: (c["advantages"] as! [Double]).map(Float.init),
                oldLogprobs: (c["old_logprobs"] as! [Double]).map(Float.init),
                proxyLogprobs: (c["proxy_logprobs"] as! [Any]).map { ($0 as? Double).map(Float.init) ?? -.infinity },
                refLogprobs: (c["ref_logprobs"] as! [Double]).map(Float.init))
            // Pass 1: current log-probs; plan; pass 2: gradients row by row.
            var current: [Float] = [], entropies: [Float] = []
            for i in 0..<tokens.count {
                var row = Array(logits[(i * V)..<((i + 1) * V)])
                let dist = RowDistribution(scaling: &row, count: V, temperature: T)
                current.append(dist.logprob(Int(tokens.targets[i])))
                entropies.append(dist.entropy())
            }
            let recordedChoice = c["chosen"] as? [Int]
            var candidatesSeen: [Int]?
            let plan = PolicyLossPlan(config: config, tokens: tokens, logprobs: current, entropies: entropies,
                                      clipCovChoice: { cand, count in
                                          candidatesSeen = cand
                                          XCTAssertEqual(count, recordedChoice?.count)
                                          return recordedChoice ?? []
                                      })
            if let want = c["candidates"] as? [Int] { XCTAssertEqual(candidatesSeen, want, "case \(n) clip_cov candidates") }
            XCTAssertEqual(plan.selected, c["selected"] as! [Bool], "case \(n) selection")
            // The clip fractions count exactly the tokens whose policy term lost its gradient to the clip.
            if case .gspo = mode { checkClipped(plan, current, "case \(n) gspo") }
            if case let .ppo(c) = mode, c.dualClip == nil { checkClipped(plan, current, "case \(n) ppo") }
            var loss = 0.0
            logits.withUnsafeMutableBufferPointer { p in
                for i in 0..<tokens.count { loss += plan.apply(row: p.baseAddress! + i * V, vocab: V, token: i) }
            }
            let want = c["loss"] as! Double
            XCTAssertEqual(loss, want, accuracy: 1e-5 * max(1, abs(want)), "case \(n) \(c["mode"]!) loss")
            let cmp = assertClose(logits, (c["dlogits"] as! [Double]).map(Float.init), atol: 1e-6, rtol: 1e-4,
                                  "case \(n) \(c["mode"]!) \(c["aggregation"]!) dlogits")
            print("case \(n) \(c["mode"]!) \(c["aggregation"]!): loss \(loss) vs \(want), dlogits max |diff| \(cmp.maxAbsDiff), selected \(plan.selected.filter { $0 }.count)")
        }
    }

    private func checkClipped(_ plan: PolicyLossPlan, _ logprobs: [Float], _ what: String) {
        for i in logprobs.indices {
            let c = plan.clipped(i, logprob: logprobs[i])
            XCTAssertFalse(c.low && c.high, what)
            let noGradient = plan.tokens.advantages[i] != 0 && plan.policyTerm(i, logprob: logprobs[i]).dLogprob == 0
            XCTAssertEqual(c.low || c.high, noGradient, "\(what) token \(i)")
        }
    }

    /// GSPO clips whole sequences: tokens whose own ratios sit inside 1 ± ε are clipped when their
    /// sequence's mean log-ratio is outside it (the clip fractions once counted token ratios).
    func testGSPOClipsBySequenceRatio() {
        var config = LossConfig(mode: .gspo(ClipOptions(epsLow: 0.0003, epsHigh: 0.0004)))
        config.aggregation = .tokenMean
        // Sequence 0: log-ratios +0.0003 and +0.0006 (each token's ratio inside 1 + 0.0004 or just
        // over), mean +0.00045: clipped high with A > 0. Sequence 1: -0.0002 and -0.0005, mean
        // -0.00035: clipped low with A < 0. Sequence 2: +0.001 and -0.001, mean 0: not clipped.
        let old: [Float] = [-1, -1, -1, -1, -2, -2]
        let delta: [Float] = [0.0003, 0.0006, -0.0002, -0.0005, 0.001, -0.001]
        let tokens = PolicyTokens(sequence: [0, 0, 1, 1, 2, 2], targets: [1, 2, 3, 4, 5, 6],
                                  advantages: [1, 1, -1, -1, 1, 1], oldLogprobs: old,
                                  proxyLogprobs: [Float](repeating: 0, count: 6))
        let current = zip(old, delta).map { $0 + $1 }
        let plan = PolicyLossPlan(config: config, tokens: tokens, logprobs: current)
        let got = current.indices.map { plan.clipped($0, logprob: current[$0]) }
        XCTAssertEqual(got.map(\.high), [true, true, false, false, false, false])
        XCTAssertEqual(got.map(\.low), [false, false, true, true, false, false])
        checkClipped(plan, current, "gspo by hand")
    }
}
