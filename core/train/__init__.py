"""The two-stage trainer of DiffusionCom and its checkpoints."""
