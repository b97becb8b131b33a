"""The test harness: what the tests at every level share (see tests/conftest.py for the
fixtures built on it)."""
