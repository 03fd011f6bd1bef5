"""Tests of the slimlm command, one file per subcommand. A package, so that its test files may
share basenames (test_generate.py, test_prune.py, ...) with the library tests of tests/distill,
tests/surgery and tests/pipeline."""
