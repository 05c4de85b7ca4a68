// The scheduler without sockets: calls queued before the compute thread starts arrive in one
// pass, which makes batching and ordering deterministic to check.
import Engine
import Foundation
import Kernels
import Models
import RPC
import Server
import TestSupport
import XCTest

/// Collects completions by tag.
final class Answers: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [String: Result<Any, RPCError>] = [:]
    private var order: [String] = []

    func callback(_ tag: String) -> Scheduler.Completion {
        { result in
            self.lock.lock()
            XCTAssertNil(self.values[tag], "\(tag) answered twice")
            self.values[tag] = result
            self.order.append(tag)
            self.lock.unlock()
        }
    }

    func wait(for tags: [String], timeout: TimeInterval = 30) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            lock.lock(); let done = tags.allSatisfy { values[$0] != nil }; lock.unlock()
            if done { return true }
            usleep(1000)
        }
        return false
    }

    func result(_ tag: String) -> [String: Any]? {
        lock.lock(); defer { lock.unlock() }
        guard case let .success(v)? = values[tag] else { return nil }
        // Calls answered on the loop come pre-encoded.
        if let raw = v as? RawJSON { return (try? JSONSerialization.jsonObject(with: Data(raw.text.utf8))) as? [String: Any] }
        return v as? [String: Any]
    }

    func error(_ tag: String) -> RPCError? {
        lock.lock(); defer { lock.unlock() }
        if case let .failure(e)? = values[tag] { return e }
        return nil
    }

    var answered: [String] { lock.lock(); defer { lock.unlock() }; return order }
}

final class SchedulerTests: XCTestCase {
    func makeScheduler(slots: Int = 8, capacity: Int = 64) throws -> Scheduler {
        Compute.setThreads(2)
        let model = try TransformerModel.load(directory: fixtureModel("qwen2_tied"))
        var config = Dispatcher.Configuration()
        config.slots = slots
        config.capacity = capacity
        return Scheduler(dispatcher: Dispatcher(model: model, tokenizer: nil, configuration: config))
    }

    func generateParams(_ prompt: [Int], tokens: Int, seed: Int) -> [String: Any] {
        ["prompt_tokens": [prompt], "max_tokens": tokens, "seed": seed, "ignore_eos": true, "temperature": 1.0]
    }

    /// Generations from different clients decode in the same steps, and their samples equal
    /// what each gets alone (seeded).
    func testGenerationsFromSeveralClientsShareSteps() throws {
        let alone = try makeScheduler()
        let a0 = Answers()
        alone.submit(method: "generate", params: generateParams([1, 2, 3], tokens: 20, seed: 7), id: .number("1"), owner: 1, completion: a0.callback("a"))
        alone.start()
        XCTAssertTrue(a0.wait(for: ["a"]))
        alone.stop()

        let s = try makeScheduler()
        let answers = Answers()
        s.submit(method: "generate", params: generateParams([1, 2, 3], tokens: 20, seed: 7), id: .number("1"), owner: 1, completion: answers.callback("a"))
        s.submit(method: "generate", params: generateParams([4, 5], tokens: 20, seed: 8), id: .number("1"), owner: 2, completion: answers.callback("b"))
        s.submit(method: "logprob", params: ["sequences": [["tokens": [1, 2, 3, 4], "response_start": 1]]], id: .number("2"), owner: 3,
                 completion: answers.callback("c"))
        s.submit(method: "logprob", params: ["sequences": [["tokens": [5, 6], "response_start": 1], ["tokens": [7, 8, 9], "response_start": 2]]],
                 id: .number("2"), owner: 4, completion: answers.callback("d"))
        s.start()
        XCTAssertTrue(answers.wait(for: ["a", "b", "c", "d"]))
        s.stop()
        let g = s.gauges
        XCTAssertEqual(g.generatorSteps, 20, "two 20-token generations decoded together take 20 steps, not 40")
        XCTAssertEqual(g.scoreForwards, 1, "two logprob calls with equal options share one forward pass")
        func tokens(_ r: [String: Any]?) -> [Int] {
            (((r?["results"] as? [[String: Any]])?[0]["samples"] as? [[String: Any]])?[0]["tokens"] as? [Int]) ?? []
        }
        XCTAssertEqual(tokens(answers.result("a")), tokens(a0.result("a")), "a seeded sample does not depend on its batch mates")
        XCTAssertEqual(tokens(answers.result("a")).count, 20)
        XCTAssertEqual((answers.result("d")?["results"] as? [Any])?.count, 2)
        XCTAssertEqual(((answers.result("c")?["results"] as? [[String: Any]])?[0]["logprobs"] as? [Any])?.count, 3)
    }

    /// train_step waits for the generations queued before it and runs before those queued after;
    /// read-only calls are not held up; weights versions tell.
    func testTrainStepRunsAtAStepBoundary() throws {
        let s = try makeScheduler()
        let answers = Answers()
        let train: [String: Any] = ["batch": [["tokens": [1, 2, 3, 4, 5], "response_start": 2, "advantage": 1.0]],
                                    "loss": ["mode": "ppo"], "optimizer": ["lr": 0.01]]
        s.submit(method: "generate", params: generateParams([1, 2, 3], tokens: 10, seed: 1), id: .number("1"), owner: 1, completion: answers.callback("g0"))
        s.submit(method: "train_step", params: train, id: .number("2"), owner: 2, completion: answers.callback("t"))
        s.submit(method: "generate", params: generateParams([1, 2, 3], tokens: 10, seed: 1), id: .number("3"), owner: 3, completion: answers.callback("g1"))
        s.submit(method: "logprob", params: ["sequences": [["tokens": [1, 2, 3, 4], "response_start": 1]]], id: .number("4"), owner: 4,
                 completion: answers.callback("l1"))
        s.submit(method: "server.info", params: nil, id: .number("5"), owner: 5, completion: answers.callback("info"))
        s.start()
        XCTAssertTrue(answers.wait(for: ["g0", "t", "g1", "l1", "info"]))
        s.stop()
        XCTAssertEqual(answers.result("g0")?["weights_version"] as? Int, 0)
        XCTAssertEqual(answers.result("t")?["weights_version"] as? Int, 1)
        XCTAssertEqual(answers.result("g1")?["weights_version"] as? Int, 1)
        XCTAssertEqual(answers.result("l1")?["weights_version"] as? Int, 1)
        XCTAssertEqual(answers.result("info")?["weights_version"] as? Int, 0, "server.info answered before the generation ended")
        XCTAssertEqual(answers.answered.first, "info")
        XCTAssertLessThan(answers.answered.firstIndex(of: "g0")!, answers.answered.firstIndex(of: "t")!)
    }

    /// `cancel` stops an in-flight generation (its caller gets `cancelled`, its slot is freed);
    /// a disconnected client's generations are cancelled the same way.
    func testCancelAndDisconnect() throws {
        let s = try makeScheduler(slots: 4, capacity: 65536)
        let answers = Answers()
        s.start()
        s.submit(method: "generate", params: generateParams([1, 2], tokens: 60000, seed: 1), id: .string("job-1"), owner: 1, completion: answers.callback("g"))
        s.submit(method: "generate", params: generateParams([3, 4], tokens: 60000, seed: 2), id: .number("9"), owner: 2, completion: answers.callback("h"))
        let deadline = Date().addingTimeInterval(10)
        while s.gauges.running < 2 && Date() < deadline { usleep(500) }
        XCTAssertEqual(s.gauges.running, 2)
        s.submit(method: "cancel", params: ["request_id": "job-1"], id: .number("2"), owner: 3, completion: answers.callback("c"))
        s.disconnected(owner: 2)
        XCTAssertTrue(answers.wait(for: ["g", "h", "c"]))
        XCTAssertEqual(answers.error("g")?.kind.rawValue, "cancelled")
        XCTAssertEqual(answers.error("h")?.kind.rawValue, "cancelled")
        XCTAssertEqual(answers.result("c")?["cancelled"] as? Int, 1)
        // Gauges are published after the pass that cancelled.
        let settle = Date().addingTimeInterval(5)
        while s.gauges.kvBytesInUse != 0 && Date() < settle { usleep(500) }
        XCTAssertEqual(s.gauges.running, 0)
        XCTAssertEqual(s.gauges.kvBytesInUse, 0, "cancelled sequences free their KV slots")
        XCTAssertLessThan(s.gauges.generatorSteps, 60000)
        let after = Answers()
        s.submit(method: "cancel", params: ["request_id": "job-1"], id: .number("3"), owner: 3, completion: after.callback("again"))
        s.submit(method: "cancel", params: [:], id: .number("4"), owner: 3, completion: after.callback("bad"))
        XCTAssertTrue(after.wait(for: ["again", "bad"]))
        XCTAssertEqual(after.result("again")?["cancelled"] as? Int, 0)
        XCTAssertEqual(after.error("bad")?.path, "params.request_id")
        s.stop()
    }

    /// Stopping answers queued and in-flight calls with `shutting_down`; later calls too.
    func testStopAnswersEverything() throws {
        let s = try makeScheduler(slots: 2, capacity: 65536)
        let answers = Answers()
        s.start()
        s.submit(method: "generate", params: generateParams([1, 2], tokens: 60000, seed: 1), id: .number("1"), owner: 1, completion: answers.callback("g"))
        let deadline = Date().addingTimeInterval(10)
        while s.gauges.running < 1 && Date() < deadline { usleep(500) }
        s.stop()
        s.submit(method: "server.info", params: nil, id: .number("2"), owner: 1, completion: answers.callback("late"))
        XCTAssertTrue(answers.wait(for: ["g", "late"]))
        XCTAssertEqual(answers.error("g")?.kind.rawValue, "shutting_down")
        XCTAssertEqual(answers.error("late")?.kind.rawValue, "shutting_down")
    }
}
