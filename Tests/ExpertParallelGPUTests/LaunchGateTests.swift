import ExpertParallelCUDA
import ExpertParallelGPU
import Foundation
import Synchronization
import Testing

/// The driver calls that may wait for the whole context take turns with per-rank launch loops
/// (LaunchGate.swift says why). Checked on the mock driver: while the gate is held, an
/// allocation, a free and a module load in another thread wait; they finish once it is let go.
@Suite(.serialized)
struct LaunchGateTests {
    private func waitsForTheGate(_ name: String, _ call: @escaping @Sendable () throws -> Void) throws {
        let finished = DispatchSemaphore(value: 0)
        LaunchGate.lock.lock()
        let thread = Thread {
            try? call()
            finished.signal()
        }
        thread.start()
        let early = finished.wait(timeout: .now() + .milliseconds(200))
        LaunchGate.lock.unlock()
        #expect(early == .timedOut, "\(name) finished while the gate was held")
        if early == .timedOut {
            #expect(finished.wait(timeout: .now() + .seconds(10)) == .success, "\(name) did not finish once the gate was let go")
        }
    }

    @Test func allocationsFreesAndLoadsTakeTurnsWithPerRankLaunches() throws {
        try MockCUDA.run { _ in
            let device = try MockCUDA.device()
            let driver = device.driver
            try waitsForTheGate("cuMemAlloc") { _ = try driver.allocate(byteCount: 256) }
            let pointer = try driver.allocate(byteCount: 256)
            try waitsForTheGate("cuMemFree") { try driver.free(pointer) }
            try waitsForTheGate("cuModuleLoadData") { _ = try driver.loadModule(image: Array("// ptx\n".utf8) + [0]) }
            try waitsForTheGate("cuCtxSynchronize") { try driver.synchronizeContext() }
        }
    }
}

/// The gate lets waiters in in the order they came.
struct TicketLockTests {
    @Test func waitersGetTheLockInTheOrderTheyCame() throws {
        let gate = TicketLock()
        let order = Mutex<[Int]>([])
        gate.lock()
        var threads: [Thread] = []
        for i in 0..<4 {
            let thread = Thread {
                gate.lock()
                order.withLock { $0.append(i) }
                gate.unlock()
            }
            threads.append(thread)
            thread.start()
            Thread.sleep(forTimeInterval: 0.05)   // thread i takes its ticket before thread i + 1 starts
        }
        gate.unlock()
        let deadline = Date().addingTimeInterval(10)
        while order.withLock({ $0.count }) < 4, Date() < deadline { Thread.sleep(forTimeInterval: 0.01) }
        #expect(order.withLock { $0 } == [0, 1, 2, 3])
    }
}
