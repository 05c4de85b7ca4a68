// Slightly over 400 lines on purpose: the passes, cancellation and shutdown all read the same private queues of the compute thread.
// The scheduler between the I/O side and the model: one compute thread owns the Dispatcher (model,
// generator, trainer, rollout store), which is handed over at construction and reachable only
// here. Calls arrive from any thread into a locked inbox; the thread works in passes. Each pass
// takes the calls in arrival order and runs each as the protocol table (`RPCMethod.traits`) says:
//   - batched: `generate` is parsed and queued on the generator, whose continuous batching
//     decodes every client's sequences together, one step per pass; `logprob` calls with the
//     same temperature and options are scored in one packed forward;
//   - exclusive: run alone at a step boundary once the generations and scores queued before
//     them are done, so no sample spans a weights change; calls behind them wait;
//   - read: run at the next pass whatever is queued (they never wait);
//   - control: `cancel` (and client disconnects) stop queued or in-flight generations and free
//     their KV slots.
// Completions run on the compute thread; callers hop elsewhere to encode and write.
import Engine
import Foundation
import RPC

/// Sendable by hand: the inbox, the disconnect list and the published figures are read and
/// written under `cond`; everything else (the dispatcher above all) only on the compute thread.
public final class Scheduler: @unchecked Sendable {
    public typealias Completion = @Sendable (Result<Any, RPCError>) -> Void

    /// A generation from another front end (the OpenAI routes): parse and format run on the
    /// compute thread, because the tokenizer and the model belong to it.
    public struct GenerateWork: Sendable {
        public var prepare: @Sendable (Dispatcher) throws -> Dispatcher.GenerateCall
        public var finish: @Sendable (Dispatcher, GenerationResult, Dispatcher.GenerateCall) throws -> Any
        public var onEvent: (@Sendable (Dispatcher, TokenEvent) -> Void)?
        public init(prepare: @escaping @Sendable (Dispatcher) throws -> Dispatcher.GenerateCall,
                    finish: @escaping @Sendable (Dispatcher, GenerationResult, Dispatcher.GenerateCall) throws -> Any,
                    onEvent: (@Sendable (Dispatcher, TokenEvent) -> Void)? = nil) {
            self.prepare = prepare; self.finish = finish; self.onEvent = onEvent
        }
    }

    enum Work {
        case generate(GenerateWork)
        case score(Params)
        /// Changes state: waits for a step boundary with nothing queued before it.
        case exclusive(@Sendable (Dispatcher) throws -> Any)
        /// Reads state: runs at the next pass whatever is queued.
        case read(@Sendable (Dispatcher) throws -> Any)
        case cancel(Any?)
    }

    struct Job {
        let work: Work
        let owner: Int
        let rpcId: RequestID?
        let completion: Completion
    }

    struct InFlight {
        let job: Job
        let call: Dispatcher.GenerateCall
        let generate: GenerateWork
    }

    private let dispatcher: Dispatcher
    private let cond = NSCondition()
    private var inbox: [Job] = []
    private var disconnected: [Int] = []
    private var stopping = false
    private var thread: Thread?
    /// Set when the compute thread has ended.
    private let finished = DispatchSemaphore(value: 0)

    /// Live figures for /metrics, published by the compute thread after every pass, so reading
    /// them never waits for a long train step.
    public struct Gauges: Sendable {
        public var tokensGenerated = 0, tokensScored = 0, trainSteps = 0, weightsVersion = 0
        public var queueDepth = 0, running = 0, kvBytes = 0, kvBytesInUse = 0, rolloutBytes = 0
        /// Generator steps and logprob forward passes run so far.
        public var generatorSteps = 0, scoreForwards = 0
        /// LoRA adapters held, in creation order (/v1/models lists them).
        public var adapters: [String] = []
    }
    private var generatorSteps = 0, scoreForwards = 0
    private var published = Gauges()
    public var gauges: Gauges {
        cond.lock(); defer { cond.unlock() }
        var g = published
        g.queueDepth += inbox.count
        return g
    }

    private func publish() {
        let d = dispatcher
        let g = Gauges(tokensGenerated: d.tokensGenerated, tokensScored: d.tokensScored, trainSteps: d.trainer.optimizer.stepCount,
                       weightsVersion: d.trainer.weightsVersion, queueDepth: pending.count + d.generator.waitingCount,
                       running: d.generator.runningCount, kvBytes: d.generator.kvCacheBytes, kvBytesInUse: d.generator.kvBytesInUse,
                       rolloutBytes: d.rollouts.bytes, generatorSteps: generatorSteps, scoreForwards: scoreForwards,
                       adapters: d.adapterNames)
        cond.lock(); published = g; let observer = weightsObserver; cond.unlock()
        if let observer {
            let key = d.publicationKey
            if key != lastPublicationKey {
                lastPublicationKey = key
                observer(key)
            }
        }
    }

    // Compute-thread state.
    private var pending: [Job] = []
    private var inFlight: [Int: InFlight] = [:]

    /// Takes the dispatcher over: from here on only the compute thread touches it.
    public init(dispatcher: sending Dispatcher) {
        self.dispatcher = dispatcher
        staticInfo = dispatcher.serverInfo()
        kvCacheBytes = dispatcher.generator.kvCacheBytes
    }

    /// Bytes of the KV cache, allocated at construction.
    public let kvCacheBytes: Int

    /// `server.info` (scheduled on the loop): the model's description does not change (a
    /// checkpoint must hold the same model) and the weights version comes from the gauges.
    /// Returned pre-encoded (re-encoded when the version changes).
    public func serverInfo() -> RawJSON {
        let version = gauges.weightsVersion
        let degraded = degradedProbe?()
        cond.lock(); defer { cond.unlock() }
        if let (v, d, text) = infoCache, v == version, d == degraded { return text }
        var info = staticInfo
        info["weights_version"] = version
        if var dp = info["data_parallel"] as? [String: Any] {
            dp["degraded"] = degraded.map { $0 as Any } ?? NSNull()
            info["data_parallel"] = dp
        }
        let text = RawJSON(String(decoding: JSONRPC.encode(info), as: UTF8.self))
        infoCache = (version, degraded, text)
        return text
    }
    private let staticInfo: [String: Any]
    private var infoCache: (Int, String?, RawJSON)?
    /// Why a data-parallel trainer is degraded (nil while it is not; set once at start, before
    /// the server handles requests). server.info and /healthz read it.
    nonisolated(unsafe) public var degradedProbe: (@Sendable () -> String?)?

    /// Starts the compute thread.
    public func start() {
        publish()
        let t = Thread { [self] in loop() }
        t.name = "ember.compute"
        t.stackSize = 16 << 20
        thread = t
        t.start()
    }

    /// Ends the compute thread after the current pass: queued and in-flight calls are answered
    /// with `shutting_down`. Blocks until the thread has ended.
    public func stop() {
        cond.lock()
        let wasRunning = !stopping && thread != nil
        stopping = true
        let observers = stopObservers
        stopObservers = []
        cond.signal()
        cond.unlock()
        for o in observers { o() }
        if wasRunning {
            finished.wait()
            // The Thread keeps its closure (and so this scheduler) alive: let both go.
            cond.lock(); thread = nil; cond.unlock()
        }
    }

    // MARK: - Submitting (any thread)

    /// Queues one JSON-RPC call from connection `owner`; `completion` runs once, on the compute
    /// thread (or at once for an unknown method or a call answered on the loop).
    public func submit(method name: String, params: Any?, id: RequestID?, owner: Int, completion: @escaping Completion) {
        let method: RPCMethod
        do { method = try RPCMethod.named(name) } catch { completion(.failure(Dispatcher.translate(error))); return }
        let box = JSONValue(params)
        let work: Work
        switch (method.traits.scheduling, method) {
        case (.loop, _):
            cond.lock(); let stopped = stopping; cond.unlock()
            do {
                guard !stopped else { throw Self.shuttingDown }
                try Params(params).only([])
                completion(.success(serverInfo()))
            } catch { completion(.failure(Dispatcher.translate(error))) }
            return
        case (.batched, .generate):
            work = .generate(GenerateWork(
                prepare: { d in try d.prepareGenerate(try Params(box.value)) },
                finish: { d, out, call in d.generateResult(out, call) }))
        case (.batched, _):
            do { work = .score(try Params(params)) } catch { completion(.failure(Dispatcher.translate(error))); return }
        case (.control, _):
            work = .cancel(params)
        case (.exclusive, _):
            work = .exclusive { d in try d.call(method, box.value) }
        case (.follower, _):
            cond.lock(); let hook = followerHook; cond.unlock()
            guard let hook else {
                completion(.failure(RPCError(.notReplica, path: "method",
                                             hint: "\(method.name) acts on a replica; start ember-server with --follow URL")))
                return
            }
            hook(method, params, completion)
            return
        case (.read, _):
            work = .read { d in try d.call(method, box.value) }
        }
        enqueue(Job(work: work, owner: owner, rpcId: id, completion: completion))
    }

    /// Queues a generation from another front end.
    public func submit(generate: GenerateWork, owner: Int, completion: @escaping Completion) {
        enqueue(Job(work: .generate(generate), owner: owner, rpcId: nil, completion: completion))
    }

    /// Runs `body` alone on the compute thread at a step boundary, after every call queued before
    /// it (the generations in flight finish first): how a replica swaps in new weights.
    public func exclusive(owner: Int = 0, _ body: @escaping @Sendable (Dispatcher) throws -> Any, completion: @escaping Completion) {
        enqueue(Job(work: .exclusive(body), owner: owner, rpcId: nil, completion: completion))
    }

    /// Answers the methods the protocol table schedules on the weight follower (a replica's
    /// `weights.sync`); without one they are refused as `not_a_replica`.
    public typealias FollowerHook = @Sendable (RPCMethod, Any?, @escaping Completion) -> Void
    public func setFollowerHook(_ hook: @escaping FollowerHook) {
        cond.lock(); followerHook = hook; cond.unlock()
    }
    private var followerHook: FollowerHook?

    /// Runs `observer` when the scheduler stops (long polls answer at once instead of holding
    /// the shutdown for their timeout).
    public func onStop(_ observer: @escaping @Sendable () -> Void) {
        cond.lock(); stopObservers.append(observer); cond.unlock()
    }
    private var stopObservers: [@Sendable () -> Void] = []

    /// Called on the compute thread after a pass in which the published weights changed (a
    /// step, a load, an adapter created, trained or deleted), with the new publication key.
    public func setWeightsObserver(_ observer: @escaping @Sendable (String) -> Void) {
        cond.lock(); weightsObserver = observer; cond.unlock()
    }
    private var weightsObserver: (@Sendable (String) -> Void)?
    private var lastPublicationKey = ""

    /// Runs `body` on the compute thread at the next pass (reads of live state such as /metrics).
    public func read(owner: Int = 0, _ body: @escaping @Sendable (Dispatcher) throws -> Any, completion: @escaping Completion) {
        enqueue(Job(work: .read(body), owner: owner, rpcId: nil, completion: completion))
    }

    /// Connection `owner` went away: its queued calls are dropped and its generations cancelled.
    public func disconnected(owner: Int) {
        cond.lock()
        disconnected.append(owner)
        cond.signal()
        cond.unlock()
    }

    private func enqueue(_ job: Job) {
        cond.lock()
        if stopping {
            cond.unlock()
            job.completion(.failure(Self.shuttingDown))
            return
        }
        inbox.append(job)
        cond.signal()
        cond.unlock()
    }

    static let shuttingDown = RPCError(.shuttingDown, hint: "the server is stopping; retry against a running server")
    static let cancelled = RPCError(.cancelled, hint: "the generation was cancelled (by `cancel` or because its client disconnected)")

    // MARK: - Compute thread

    private func loop() {
        while true {
            cond.lock()
            while inbox.isEmpty && disconnected.isEmpty && !stopping && dispatcher.generator.isIdle && !hasRunnable() {
                cond.wait()
            }
            let arrived = inbox, gone = disconnected, stop = stopping
            inbox = []
            disconnected = []
            cond.unlock()

            pending += arrived
            for owner in gone { dropOwner(owner) }
            if stop {
                for job in pending { job.completion(.failure(Self.shuttingDown)) }
                pending = []
                for (id, f) in inFlight {
                    dispatcher.generator.cancel(id)
                    f.job.completion(.failure(Self.shuttingDown))
                }
                inFlight = [:]
                publish()
                finished.signal()
                return
            }
            pass()
            if !dispatcher.generator.isIdle { stepGenerator() }
            publish()
        }
    }

    /// Whether a pending job could run now (an exclusive call waiting for an idle generator).
    private func hasRunnable() -> Bool {
        !pending.isEmpty && dispatcher.generator.isIdle
    }

    /// One pass over pending calls in arrival order.
    private func pass() {
        // Cancels first: they may remove queued generations.
        let cancels = pending.filter { if case .cancel = $0.work { return true } else { return false } }
        pending.removeAll { if case .cancel = $0.work { return true } else { return false } }
        for job in cancels {
            if case let .cancel(params) = job.work { run(job) { try self.cancel(params) } }
        }
        var blocked = false
        var scores: [(Job, Dispatcher.ScoreCall)] = []
        var keep: [Job] = []
        for job in pending {
            switch job.work {
            case let .read(body):
                run(job) { try body(self.dispatcher) }
            case .cancel:
                break
            case let .generate(g):
                if blocked { keep.append(job); continue }
                do {
                    let call = try g.prepare(dispatcher)
                    var c = call
                    if g.onEvent != nil { c.options.events = true }
                    let id = try dispatcher.submit(c)
                    inFlight[id] = InFlight(job: job, call: c, generate: g)
                } catch {
                    job.completion(.failure(Dispatcher.translate(error)))
                }
            case let .score(params):
                if blocked { keep.append(job); continue }
                do { scores.append((job, try dispatcher.prepareLogprob(params))) }
                catch { job.completion(.failure(Dispatcher.translate(error))) }
            case let .exclusive(body):
                if blocked || !dispatcher.generator.isIdle {
                    blocked = true
                    keep.append(job)
                    continue
                }
                runScores(scores)
                scores = []
                // Figures are published before the answer goes out: a client that reads
                // /metrics after its answer sees the call counted.
                let outcome = Result { try body(self.dispatcher) }
                publish()
                switch outcome {
                case let .success(v): job.completion(.success(v))
                case let .failure(e): job.completion(.failure(Dispatcher.translate(e)))
                }
            }
        }
        pending = keep
        runScores(scores)
    }

    private func run(_ job: Job, _ body: () throws -> Any) {
        do { job.completion(.success(try body())) } catch { job.completion(.failure(Dispatcher.translate(error))) }
    }

    /// Scores queued `logprob` calls, one packed forward per distinct (temperature, options).
    private func runScores(_ scores: [(Job, Dispatcher.ScoreCall)]) {
        var groups: [[(Job, Dispatcher.ScoreCall)]] = []
        for s in scores {
            if let g = groups.firstIndex(where: { $0[0].1.temperature == s.1.temperature && $0[0].1.options == s.1.options }) {
                groups[g].append(s)
            } else {
                groups.append([s])
            }
        }
        for g in groups {
            scoreForwards += 1
            do {
                let results = try dispatcher.score(g.map(\.1))
                let values = g.enumerated().map { i, item in dispatcher.logprobResult(results[i], item.1) }
                publish()
                for (i, (job, _)) in g.enumerated() { job.completion(.success(values[i])) }
            } catch {
                for (job, _) in g { job.completion(.failure(Dispatcher.translate(error))) }
            }
        }
    }

    private func stepGenerator() {
        let done: [GenerationResult]
        generatorSteps += 1
        do {
            done = try dispatcher.generator.step()
        } catch {
            // A failed step fails every generation in it (their slots are released).
            for (id, f) in inFlight {
                dispatcher.generator.cancel(id)
                f.job.completion(.failure(Dispatcher.translate(error)))
            }
            inFlight = [:]
            return
        }
        for e in dispatcher.generator.takeEvents() {
            if let f = inFlight[e.requestId], let sink = f.generate.onEvent { sink(dispatcher, e) }
        }
        var answers: [(Job, Result<Any, Error>)] = []
        for result in done {
            guard let f = inFlight.removeValue(forKey: result.requestId) else { continue }
            answers.append((f.job, Result { try f.generate.finish(self.dispatcher, result, f.call) }))
        }
        if !answers.isEmpty { publish() }
        for (job, outcome) in answers {
            switch outcome {
            case let .success(v): job.completion(.success(v))
            case let .failure(e): job.completion(.failure(Dispatcher.translate(e)))
            }
        }
    }

    /// `cancel {request_id}`: cancels every in-flight or queued generation whose JSON-RPC id
    /// equals `request_id`.
    private func cancel(_ params: Any?) throws -> Any {
        let p = try Params(params)
        try p.only(["request_id"])
        guard p.has("request_id"), let target = JSONRPC.parseID(p.object["request_id"]!), target != .null else {
            throw RPCError.invalidParams(path: "params.request_id", "the id (string or number) of the generate call to cancel")
        }
        var count = 0
        for (id, f) in inFlight where f.job.rpcId == target {
            dispatcher.generator.cancel(id)
            inFlight[id] = nil
            f.job.completion(.failure(Self.cancelled))
            count += 1
        }
        pending.removeAll { job in
            guard job.rpcId == target, case .generate = job.work else { return false }
            job.completion(.failure(Self.cancelled))
            count += 1
            return true
        }
        return ["cancelled": count]
    }

    private func dropOwner(_ owner: Int) {
        for (id, f) in inFlight where f.job.owner == owner {
            dispatcher.generator.cancel(id)
            inFlight[id] = nil
            f.job.completion(.failure(Self.cancelled))
        }
        pending.removeAll { job in
            guard job.owner == owner else { return false }
            switch job.work {
            case .generate, .score:
                job.completion(.failure(Self.cancelled))
                return true
            default:
                return false
            }
        }
    }
}
