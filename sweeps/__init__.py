"""sweeps package: Ray Tune studies of DiffusionCom, kept at the edge of the platform.

* :mod:`sweeps.study` reads and checks study files (``sweeps/studies/*.yaml``: searches, ablations
  and sensitivity sweeps, each naming its launch command on its first line) and expands ablations,
  sensitivity sweeps and grid searches into trials with stable directory names.
* :mod:`sweeps.experiment` lays out experiment folders (names, storage, provenance, run states).
* :mod:`sweeps.stage1` shares one stage-1 run between trials whose stage 1 is identical.
* :mod:`sweeps.trial` runs one trial (core training, reports, failures) without Ray.
* :mod:`sweeps.ray_adapter` is the only module that imports Ray: launch, resume and extend.
* :mod:`sweeps.cli` adds ``diffcom sweep launch|resume|extend|status``.
"""
