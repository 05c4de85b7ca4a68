// The spinning worker pool behind `Compute.spinning`: every index runs exactly once with the
// same split as outside the scope, nested and concurrent regions fall back safely, and many
// short regions in a row (a decode step's pattern) neither lose work nor deadlock.
import Foundation
import Kernels
import XCTest

final class SpinPoolTests: XCTestCase {
    override func setUp() { Compute.setThreads(2) }

    func testRegionsInsideTheScopeMatchThoseOutside() {
        let n = 10_007
        func fill() -> [Double] {
            var out = [Double](repeating: 0, count: n)
            out.withUnsafeMutableBufferPointer { buf in
                let p = UncheckedBox(buf.baseAddress!)
                parallelFor(n) { i in p.value[i] = sin(Double(i)) * Double(i % 13) }
            }
            return out
        }
        var ranges: [[Int]] = []
        let lock = NSLock()
        let plain = fill()
        parallelRanges(1000) { w, lo, hi in lock.lock(); ranges.append([w, lo, hi]); lock.unlock() }
        let plainRanges = ranges.sorted { $0[0] < $1[0] }
        ranges = []
        let (spun, spunRanges): ([Double], [[Int]]) = Compute.spinning {
            let values = fill()
            parallelRanges(1000) { w, lo, hi in lock.lock(); ranges.append([w, lo, hi]); lock.unlock() }
            return (values, ranges.sorted { $0[0] < $1[0] })
        }
        XCTAssertEqual(spun, plain)
        XCTAssertEqual(spunRanges, plainRanges, "the same split into workers")
        XCTAssertEqual(plainRanges.map { $0[2] - $0[1] }.reduce(0, +), 1000)
    }

    /// `parallelClaim` (GEMM work items): every item runs exactly once, inside a spinning scope or
    /// not, for counts around the thread count, and when one item stalls its worker.
    func testClaimedItemsRunExactlyOnce() {
        for spinning in [false, true] {
            for count in [0, 1, 2, 3, 7, 64, 1001] {
                let runs = UnsafeMutablePointer<Int>.allocate(capacity: max(1, count))
                runs.initialize(repeating: 0, count: max(1, count))
                defer { runs.deallocate() }
                let box = UncheckedBox(runs)
                let body = {
                    parallelClaim(count) { i in
                        if i == 0 { usleep(20_000) }   // a stalled worker: the other takes the rest
                        box.value[i] += 1
                    }
                }
                if spinning { Compute.spinning(body) } else { body() }
                XCTAssertEqual((0..<count).filter { runs[$0] != 1 }, [], "count \(count), spinning \(spinning)")
            }
        }
    }

    func testManyShortRegionsAndNesting() {
        let counter = UnsafeMutablePointer<Int>.allocate(capacity: 2)
        defer { counter.deallocate() }
        let box = UncheckedBox(counter)
        Compute.spinning {
            for round in 0..<20_000 {
                counter[0] = 0; counter[1] = 0
                parallelRanges(2) { w, lo, hi in box.value[w] += hi - lo }
                XCTAssertEqual(counter[0] + counter[1], 2, "round \(round)")
                if counter[0] + counter[1] != 2 { break }
            }
            // A region started inside a region's body runs (through libdispatch), not deadlocks.
            let inner = UnsafeMutablePointer<Int>.allocate(capacity: 2)
            defer { inner.deallocate() }
            inner.initialize(repeating: 0, count: 2)
            let innerBox = UncheckedBox(inner)
            parallelRanges(2) { w, _, _ in
                parallelRanges(100) { _, lo, hi in _ = lo; _ = hi }
                innerBox.value[w] = 1
            }
            XCTAssertEqual(inner[0] + inner[1], 2)
        }
    }

    func testConcurrentScopesFromTwoThreads() {
        let group = DispatchGroup()
        let sums = UnsafeMutablePointer<Int>.allocate(capacity: 2)
        defer { sums.deallocate() }
        sums.initialize(repeating: 0, count: 2)
        let box = UncheckedBox(sums)
        for t in 0..<2 {
            group.enter()
            Thread {
                Compute.spinning {
                    for _ in 0..<2_000 {
                        let partial = UnsafeMutablePointer<Int>.allocate(capacity: 2)
                        partial.initialize(repeating: 0, count: 2)
                        let pbox = UncheckedBox(partial)
                        parallelRanges(64) { w, lo, hi in pbox.value[w] = (lo..<hi).reduce(0, +) }
                        box.value[t] += partial[0] + partial[1]
                        partial.deallocate()
                    }
                }
                group.leave()
            }.start()
        }
        XCTAssertEqual(group.wait(timeout: .now() + 60), .success, "no deadlock")
        XCTAssertEqual(sums[0], 2_000 * (63 * 64 / 2))
        XCTAssertEqual(sums[1], 2_000 * (63 * 64 / 2))
    }
}
