"""Coix-style example workflows, kept as compatibility checks.

Each module is written the way Coix's example scripts write their programs
(``import ... as coix``, a particle plate opened by hand, a batch of data
sets as an undeclared batch dimension, path-form SMC targets, Coix's
``util.train`` call shape), with generated data and this project's own
code. The only line that names the library is the import, so
``benchmarks/coix_parity.py`` can run the same source under Coix and under
this library and compare losses and gradients at identical parameters.

The test suite runs each one in a smoke configuration
(``tests/test_coix_examples.py``).
"""
