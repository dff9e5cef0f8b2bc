"""analysis package: tables, figures and reports from experiment folders on disk.

It reads files only (through the format, :mod:`runstore`; never ``core``, ``ray`` or torch), so it works on an experiment folder copied to another machine.

* :mod:`analysis.load` turns experiment folders into one tidy pandas frame, and every run's
  ``metrics.jsonl`` into a per-epoch frame of learning curves.
* :mod:`analysis.stats` has the statistics (t intervals, paired t-test, paired bootstrap, the
  two-level bootstrap over seeds and queries).
* :mod:`analysis.tables` builds the ablation, sensitivity and protocol-audit tables.
* :mod:`analysis.figures` draws the plotly figures (sensitivity, search, learning curves, the
  ablation's forest plot).
* :mod:`analysis.report` writes ``report.html`` and the tables; :mod:`analysis.cli` adds
  ``diffcom report``.
"""
