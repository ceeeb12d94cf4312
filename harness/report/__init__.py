"""Reports: pure functions of run files (they import only :mod:`harness.results`)."""
