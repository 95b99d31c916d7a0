import ExpertParallelCUDA
import ExpertParallelGPU
import Foundation
import Synchronization
import Testing

/// Module loads and unloads, eager function loads, allocations and frees take turns with per-rank
/// launch loops (LaunchGate.swift says why). Checked on the mock driver: while the gate is held,
/// each waits in another thread; it finishes once the gate is let go. Copies and fills do not wait.
@Suite(.serialized)
struct LaunchGateTests {
    /// Whether `call`, made in another thread while the gate is held, waits for the gate.
    private func waitsForTheGate(_ call: @escaping @Sendable () throws -> Void) -> Bool {
        let finished = DispatchSemaphore(value: 0)
        LaunchGate.lock.lock()
        let thread = Thread {
            try? call()
            finished.signal()
        }
        thread.start()
        let early = finished.wait(timeout: .now() + .milliseconds(200))
        LaunchGate.lock.unlock()
        if early == .timedOut {
            #expect(finished.wait(timeout: .now() + .seconds(10)) == .success, "the call did not finish once the gate was let go")
        }
        return early == .timedOut
    }

    @Test func loadsAllocationsAndFreesTakeTurnsWithPerRankLaunchesAndFillsDoNot() throws {
        try MockCUDA.run { _ in
            let driver = try MockCUDA.device().driver
            let image = Array("// ptx\n".utf8) + [0]
            #expect(waitsForTheGate { _ = try driver.loadModule(image: image) }, "cuModuleLoadData")
            let module = try driver.loadModule(image: image)
            #expect(waitsForTheGate { try driver.unload(module) }, "cuModuleUnload")
            #expect(waitsForTheGate { _ = try driver.allocate(byteCount: 256) }, "cuMemAlloc")
            let memory = try driver.allocate(byteCount: 256)
            #expect(!waitsForTheGate { try driver.fill(memory, byte: 0, byteCount: 256) }, "cuMemsetD8")
            #expect(waitsForTheGate { try driver.free(memory) }, "cuMemFree")
            #expect(waitsForTheGate { try driver.freeHost(try driver.allocateHost(byteCount: 256)) }, "cuMemAllocHost")
            let host = UInt(bitPattern: try driver.allocateHost(byteCount: 256))
            #expect(waitsForTheGate { try driver.freeHost(UnsafeMutableRawPointer(bitPattern: host)!) }, "cuMemFreeHost")
        }
    }
}

/// The gate lets waiters in in the order they came.
struct TicketLockTests {
    @Test func waitersGetTheLockInTheOrderTheyCame() throws {
        let gate = TicketLock()
        let order = Mutex<[Int]>([])
        gate.lock()
        for i in 0..<4 {
            Thread {
                gate.lock()
                order.withLock { $0.append(i) }
                gate.unlock()
            }.start()
            Thread.sleep(forTimeInterval: 0.05)   // thread i takes its ticket before thread i + 1 starts
        }
        gate.unlock()
        let deadline = Date().addingTimeInterval(10)
        while order.withLock({ $0.count }) < 4, Date() < deadline { Thread.sleep(forTimeInterval: 0.01) }
        #expect(order.withLock { $0 } == [0, 1, 2, 3])
    }
}
