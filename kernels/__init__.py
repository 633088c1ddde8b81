"""Triton kernels, installed as ``fastkd.kernels`` (one module per loss family).

Importing a module here imports triton; ``fastkd._dispatch`` only does so when
the triton backend is chosen. Under ``TRITON_INTERPRET=1`` (set before triton
is imported) every kernel runs in Triton's interpreter on CPU tensors, which is
how the tests check them without a GPU.

The folder sits at the repository root, so wherever the root is on
``sys.path`` (pytest, ``python`` started there) it is also importable as a
top-level package ``kernels``, the name of Hugging Face's kernel-hub package
that transformers imports. Imported under that name, it hands the import over
to an installed package ``kernels`` when there is one.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _installed_spec():
        """The spec of a ``kernels`` found on ``sys.path`` outside this repository, or None."""
        root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        elsewhere = [
            p for p in sys.path if not isinstance(p, str) or os.path.realpath(p or os.curdir) != root
        ]
        return importlib.machinery.PathFinder.find_spec(__name__, elsewhere)

    _spec = _installed_spec()
    if _spec is not None:
        # the import system returns whatever sys.modules holds once this file has run
        _installed = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _installed
        _spec.loader.exec_module(_installed)
