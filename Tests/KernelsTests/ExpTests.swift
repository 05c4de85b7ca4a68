// The vectorized exp against libm in double precision.
import Foundation
import Kernels
import XCTest

final class ExpTests: XCTestCase {
    func testAccuracyAcrossTheRange() {
        var worst = 0.0
        var x: Float = -87
        while x < 88 {
            let got = Double(exp1(x)), want = Foundation.exp(Double(x))
            worst = max(worst, abs(got - want) / want)
            x += 0.0137
        }
        print("exp8 worst relative error \(worst)")
        XCTAssertLessThan(worst, 3e-7)   // ~2.5 ulp
    }

    func testSpecialValues() {
        XCTAssertEqual(exp1(0), 1)
        XCTAssertEqual(exp1(-.infinity), 0)
        XCTAssertEqual(exp1(-100), 0)
        XCTAssertEqual(exp1(.infinity), .infinity)
        XCTAssertEqual(exp1(100), .infinity)
        XCTAssertTrue(exp1(.nan).isNaN)
    }

    func testTailLanesMatchFullLanes() {
        let xs: [Float] = (0..<13).map { Float($0) * 0.37 - 2 }
        var out = [Float](repeating: 0, count: 13)
        _ = expShiftSum(&out, xs, 13, shift: 0.5)
        for (i, v) in xs.enumerated() { XCTAssertEqual(out[i].bitPattern, exp1(v - 0.5).bitPattern) }
    }
}
