"""The test suites; `tests.support` is what they share."""
