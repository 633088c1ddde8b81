"""Drop-in losses for other training stacks; each submodule imports its stack only when used.

- :mod:`fastkd.integrations.trl`: TRL's ``GKDTrainer.generalized_jsd_loss`` and
  ``DistillationTrainer._compute_loss`` on fastkd's fused kernels.
"""
