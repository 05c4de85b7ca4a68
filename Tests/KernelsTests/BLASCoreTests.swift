// The OpenBLAS kernel-set check.
import Foundation
import Kernels
import XCTest

/// When Ember restarts itself with another OpenBLAS kernel set: never over a user's choice.
final class BLASCoreTests: XCTestCase {
    func testAUsersChoiceAndTheOptOutStand() {
        XCTAssertNil(BLASCore.betterCoreType(environment: ["OPENBLAS_CORETYPE": "Prescott"]))
        XCTAssertNil(BLASCore.betterCoreType(environment: ["EMBER_KEEP_OPENBLAS_CORE": "1"]))
        XCTAssertFalse(BLASCore.name.isEmpty)
        if BLASCore.modern.contains(BLASCore.name) { XCTAssertNil(BLASCore.betterCoreType(environment: [:])) }
        else if BLASCore.cpuHasAVX2FMA { XCTAssertEqual(BLASCore.betterCoreType(environment: [:]), "Haswell") }
    }
}
