"""The test suite; its folders mirror the package (tests/modeling/ tests ore/modeling/)."""
