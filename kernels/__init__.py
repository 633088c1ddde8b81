"""Triton kernels, installed as ``fastkd.kernels`` (one module per loss family).

Importing a module here imports triton; ``fastkd._dispatch`` only does so when
the triton backend is chosen.
"""
