// Worker threads for decode steps. A decode step is dozens of short parallel regions (one per
// projection, norm and attention of every layer); handing each to libdispatch costs a thread
// wake-up per region, ~15% of a batch-1 step. Inside `Compute.spinning { }` the regions go to
// persistent workers that spin between them instead; when the scope closes the workers go back to
// sleep, so training (whose backward runs OpenBLAS with its own spinning threads) never competes
// with them. The work split is the one `concurrentPerform` gets, so results are bit-identical.
import Foundation
import Synchronization

/// Sendable by hand: workers and the caller meet through atomics and a condition; each region's
/// closure writes disjoint outputs.
final class SpinPool: @unchecked Sendable {
    /// Worker threads besides the caller.
    let extra: Int
    private let generation = Atomic<Int>(0)
    private let finished = Atomic<Int>(0)
    private let scopes = Atomic<Int>(0)
    private let sleepers = Atomic<Int>(0)
    private let busy = Atomic<Bool>(false)
    private let condition = NSCondition()
    // Written by the caller before `generation` is bumped (release), read by workers after they
    // observe the bump (acquire).
    private var job: ((Int) -> Void)?
    private var jobWorkers = 0

    init(extra: Int) {
        self.extra = extra
        for w in stride(from: 1, through: extra, by: 1) {
            let t = Thread { [unowned self] in self.work(w) }
            t.stackSize = 1 << 20
            t.start()
        }
    }

    func enter() { scopes.add(1, ordering: .sequentiallyConsistent) }
    func leave() { scopes.subtract(1, ordering: .sequentiallyConsistent) }
    var isSpinning: Bool { scopes.load(ordering: .relaxed) > 0 }

    /// Runs `body(w)` for w in 0..<workers (workers <= extra + 1), the caller taking w = 0.
    /// Returns false without running anything if the pool is already running a job (a nested or
    /// concurrent call): the caller then falls back to libdispatch.
    func run(workers: Int, _ body: @escaping (Int) -> Void) -> Bool {
        guard workers - 1 <= extra, busy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged else {
            return false
        }
        job = body
        jobWorkers = workers
        finished.store(0, ordering: .relaxed)
        generation.add(1, ordering: .sequentiallyConsistent)
        if sleepers.load(ordering: .sequentiallyConsistent) > 0 {
            condition.lock(); condition.broadcast(); condition.unlock()
        }
        body(0)
        while finished.load(ordering: .acquiring) < extra {}
        job = nil
        busy.store(false, ordering: .releasing)
        return true
    }

    private func work(_ w: Int) {
        var seen = 0
        while true {
            var g = generation.load(ordering: .acquiring)
            var spins = 0
            while g == seen {
                spins += 1
                let open = scopes.load(ordering: .relaxed) > 0
                if !open || spins > Self.spinRounds {
                    // Scope closed, or no job for a while (~50 us): sleep until the next job (or,
                    // with the scope closed, until one opens).
                    condition.lock()
                    sleepers.add(1, ordering: .sequentiallyConsistent)
                    while generation.load(ordering: .sequentiallyConsistent) == seen
                            && !(!open && scopes.load(ordering: .sequentiallyConsistent) > 0) {
                        condition.wait()
                    }
                    sleepers.subtract(1, ordering: .sequentiallyConsistent)
                    condition.unlock()
                    spins = 0
                }
                g = generation.load(ordering: .acquiring)
            }
            seen = g
            if w < jobWorkers, let job { job(w) }
            finished.add(1, ordering: .releasing)
        }
    }

    /// Rounds a worker spins waiting for the next job before it sleeps.
    static let spinRounds = 50_000

    /// Wakes sleeping workers so they start spinning (a scope just opened).
    func wake() {
        if sleepers.load(ordering: .sequentiallyConsistent) > 0 {
            condition.lock(); condition.broadcast(); condition.unlock()
        }
    }
}
