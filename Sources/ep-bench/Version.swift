/// ExpertParallel's version, as `ep-bench --version` reports it. The single source is the
/// repository's VERSION file (read by python/setup.py and the Python package's `__version__`);
/// python/tests/test_packaging.py fails when this constant or the built ep-bench disagrees with it.
let expertParallelVersion = "0.1.0"
