"""sweeps package: Ray Tune studies of DiffusionCom, kept at the edge of the platform.

* :mod:`sweeps.study` reads and checks study files (``sweeps/studies/*.yaml``: searches, ablations
  and sensitivity sweeps, each naming its launch command on its first line) and expands ablations,
  sensitivity sweeps and grid searches into trials with stable directory names. It never imports
  Ray; the Ray adapter translates its search spaces into ``ray.tune`` distributions.
"""
