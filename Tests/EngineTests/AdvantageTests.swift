// Advantage estimators on hand-computed values, and on the cases the Python client's
// estimators are checked against too (Tests/Fixtures/advantages.json): one rule on both sides.
import Engine
import Foundation
import TestSupport
import XCTest

final class AdvantageTests: XCTestCase {
    let rewards: [Double] = [1, 0, 0, 1, /* group b */ 1, 1, 1, /* group c */ 0.5, /* group d */ 2, 0]
    let groups = ["a", "a", "a", "a", "b", "b", "b", "c", "d", "d"]

    func testGRPO() {
        let a = Advantages.compute(.grpo, rewards: rewards, groups: groups)
        // group a: mean 0.5, unbiased std sqrt(1/3) = 0.57735
        let s = (1.0 / 3.0).squareRoot() + 1e-6
        XCTAssertEqual(a[0], 0.5 / s, accuracy: 1e-12)
        XCTAssertEqual(a[1], -0.5 / s, accuracy: 1e-12)
        XCTAssertEqual(Array(a[4...6]), [0, 0, 0], "equal rewards carry no signal")
        XCTAssertEqual(a[7], 0, "a group of one has no baseline")
        // group d: mean 1, std sqrt(2)
        XCTAssertEqual(a[8], 1 / (2.0.squareRoot() + 1e-6), accuracy: 1e-12)
    }

    func testDrGRPOAndRLOO() {
        let d = Advantages.compute(.drGRPO, rewards: rewards, groups: groups)
        XCTAssertEqual(Array(d[0...3]), [0.5, -0.5, -0.5, 0.5])
        XCTAssertEqual(d[7], 0, "a group of one has no baseline")
        let r = Advantages.compute(.rloo, rewards: rewards, groups: groups)
        // rloo: r_i minus the mean of the other three
        XCTAssertEqual(r[0], 1 - 1.0 / 3.0, accuracy: 1e-12)
        XCTAssertEqual(r[1], 0 - 2.0 / 3.0, accuracy: 1e-12)
        XCTAssertEqual(r[7], 0, "a group of one has no baseline")
        XCTAssertEqual(r[8], 2, accuracy: 1e-12)
        XCTAssertEqual(Advantages.constantGroups(rewards: rewards, groups: groups), ["b", "c"])
    }

    func testSharedCasesAgreeWithThePythonClient() throws {
        let data = try Data(contentsOf: URL(fileURLWithPath: fixturesDirectory + "/advantages.json"))
        let cases = try JSONSerialization.jsonObject(with: data) as! [[String: Any]]
        for c in cases {
            let rewards = (c["rewards"] as! [NSNumber]).map(\.doubleValue), groups = c["groups"] as! [String]
            for (name, expected) in c["expected"] as! [String: [NSNumber]] {
                let got = Advantages.compute(AdvantageEstimator(rawValue: name)!, rewards: rewards, groups: groups)
                for (g, e) in zip(got, expected) { XCTAssertEqual(g, e.doubleValue, accuracy: 1e-12, "\(name) \(rewards) \(groups)") }
            }
        }
    }
}
