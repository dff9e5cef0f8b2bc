"""diffcom package: the ``diffcom`` command, the one module that joins ``core``, ``sweeps`` and
``analysis``.

* :mod:`diffcom.cli` builds the parser from each package's subcommands and owns the error policy.

The packages below it never import it: ``core`` knows neither ``sweeps`` nor ``analysis``.
"""
