// The data-parallel gradient sum's arithmetic, without MPI: for any number of leaves and ranks,
// the ranks' largest subtrees combined over the fixed tree give the bits of the one-process sum
// (clients/python/tests/test_data_parallel.py runs the real ranks under mpirun). Also the exact
// round trip of the command rank 0 sends.
import Engine
import Foundation
import TestSupport
import XCTest

final class DataParallelTests: XCTestCase {
    /// Leaf values of very different magnitudes, so that the order of additions shows in the bits.
    func leafValues(_ leaves: Int, width: Int, seed: UInt64) -> [[Float]] {
        var rng = SplitMix(seed: seed)
        return (0..<leaves).map { _ in
            (0..<width).map { _ in
                let scale = Float(pow(2.0, Double(rng.next() % 40) - 20))
                return (Float(rng.next() % 2_000_000) / 1_000_000 - 1) * scale
            }
        }
    }

    func sum(_ a: [Float], _ b: [Float]) -> [Float] { zip(a, b).map { $0 + $1 } }

    func testRanksSubtreesCombineToTheOneProcessSumBitForBit() throws {
        for leaves in 1...19 {
            let tree = LeafTree(leaves: leaves)
            let values = leafValues(leaves, width: 64, seed: UInt64(leaves))
            let whole = try tree.evaluate(tree.root, leaf: { values[$0] }, add: { sum($0, $1) })!
            for ranks in 1...6 {
                let blocks = tree.blocks(ranks: ranks)
                XCTAssertEqual(blocks.map(\.count).reduce(0, +), leaves)
                var known: [LeafTree.Node: [Float]] = [:]
                var covered: [Int] = []
                for block in blocks {
                    for node in tree.nodes(covering: block) {
                        let leavesOfNode = node.lo..<min(node.hi, leaves)
                        XCTAssertTrue(leavesOfNode.lowerBound >= block.lowerBound && leavesOfNode.upperBound <= block.upperBound)
                        covered += Array(leavesOfNode)
                        known[node] = try tree.evaluate(node, leaf: { values[$0] }, add: { sum($0, $1) })
                    }
                }
                XCTAssertEqual(covered, Array(0..<leaves), "every leaf on exactly one rank, in order")
                let combined = try tree.evaluate(tree.root, known: { known[$0] }, leaf: { j -> [Float] in
                    XCTFail("leaf \(j) recomputed"); return []
                }, add: { sum($0, $1) })!
                XCTAssertEqual(combined.map(\.bitPattern), whole.map(\.bitPattern), "\(leaves) leaves on \(ranks) ranks")
            }
        }
        // The order matters (so the test above could fail): a left-to-right sum differs somewhere.
        let values = leafValues(7, width: 64, seed: 7)
        let tree = LeafTree(leaves: 7)
        let byTree = try tree.evaluate(tree.root, leaf: { values[$0] }, add: { sum($0, $1) })!
        let byFold = values.dropFirst().reduce(values[0], sum)
        XCTAssertNotEqual(byTree.map(\.bitPattern), byFold.map(\.bitPattern))
    }

    func testABlockGetsFewNodes() {
        // Even splits of a power-of-two tree: one node per rank.
        let tree = LeafTree(leaves: 8)
        for ranks in [1, 2, 4, 8] {
            XCTAssertTrue(tree.blocks(ranks: ranks).allSatisfy { tree.nodes(covering: $0).count == 1 })
        }
        // Three ranks over eight leaves: [0,2) [2,5) [5,8) -> 1, 2, 2 nodes.
        XCTAssertEqual(tree.blocks(ranks: 3).map { tree.nodes(covering: $0).count }, [1, 2, 2])
        // More ranks than leaves: the extra ranks hold nothing.
        XCTAssertEqual(LeafTree(leaves: 2).blocks(ranks: 4).map { LeafTree(leaves: 2).nodes(covering: $0).count }, [0, 1, 0, 1])
    }

    func testTheCommandRoundTripsExactly() throws {
        var lp = LpRegOptions()
        lp.rho = 0.013
        lp.proxy = .threshold(0.0031)
        var config = LossConfig(mode: .lpReg(lp))
        config.temperature = 0.7
        var item = TrainItem(tokens: [5, 6, 7, 8], responseStart: 2, advantages: [0.1, -1e-30],
                             oldLogprobs: [-0.3333333, -17.25], proxyLogprobs: [-.infinity, -1e-7], lossMask: [true, false],
                             samplerVersion: 3)
        item.advantages[0] = Float(bitPattern: 0x3DCC_CCCD)
        let command = TrainCommand(items: [item], config: config, miniBatches: 1, microBatchTokens: 40, dryRun: false,
                                   settings: AdamWSettings(lr: 3e-4, weightDecay: 0.01), schedule: .cosine(warmupSteps: 3, totalSteps: 10, minLR: 1e-6),
                                   weightsVersion: 4, optimizerSteps: 4)
        let back = try TrainCommand.decode(try command.encoded())
        XCTAssertEqual(back.config, config)
        XCTAssertEqual(back.settings, command.settings)
        XCTAssertEqual(back.schedule, command.schedule)
        XCTAssertEqual(back.microBatchTokens, 40)
        let b = back.items[0]
        XCTAssertEqual(b.tokens, item.tokens)
        XCTAssertEqual(b.advantages.map(\.bitPattern), item.advantages.map(\.bitPattern))
        XCTAssertEqual(b.oldLogprobs!.map(\.bitPattern), item.oldLogprobs!.map(\.bitPattern))
        XCTAssertEqual(b.proxyLogprobs!.map(\.bitPattern), item.proxyLogprobs!.map(\.bitPattern))
        XCTAssertEqual(b.lossMask, item.lossMask)
        XCTAssertEqual(b.samplerVersion, 3)
    }

    func testRankMessagesRoundTrip() throws {
        var w = ByteWriter()
        w.floats([1.5, -.infinity, Float(bitPattern: 1)])
        w.doubles([0.1, -2])
        w.bools([true, false, true])
        w.text("rank 2: ü")
        var r = ByteReader(w.bytes)
        XCTAssertEqual(try r.floats().map(\.bitPattern), [Float(1.5), -.infinity, Float(bitPattern: 1)].map(\.bitPattern))
        XCTAssertEqual(try r.doubles(), [0.1, -2])
        XCTAssertEqual(try r.bools(), [true, false, true])
        XCTAssertEqual(try r.text(), "rank 2: ü")
        var short = ByteReader(Array(w.bytes.prefix(10)))
        XCTAssertThrowsError(try short.floats())
    }
}

/// A small deterministic generator for the test's values.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
