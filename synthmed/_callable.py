"""Modules that can be called: ``synthmed.qc(...)`` is ``synthmed.qc.run.qc(...)``.

``synthmed.qc`` and ``synthmed.finetune`` are both a module (``import synthmed.qc.metrics``,
``from synthmed.finetune import read_training_manifest``) and the library's entry point of that
name (``synthmed.qc(out)``, ``synthmed.finetune(manifest, "scratch", "models/mine")``). Python
sets ``synthmed.qc`` to the subpackage as soon as anything imports it, so a plain function of
that name could not survive in the package namespace; instead the module's class is swapped
for a ``ModuleType`` subclass with ``__call__`` (assigning ``module.__class__`` is supported
since Python 3.5), and calling the module calls its function.

``synthmed/finetune.py`` ends with ``make_callable(__name__, "synthmed.finetune:finetune")``
and ``synthmed/qc/__init__.py`` with ``make_callable(__name__, "synthmed.qc.run:qc")``; the lazy
``synthmed.__getattr__`` makes a module callable where it is not yet, so either order of import works.
"""

from __future__ import annotations

import importlib
import sys
import types


class CallableModule(types.ModuleType):
    """A module whose call runs the function named by its ``__synthmed_call__`` ("module:function")."""

    def __call__(self, *args, **kwargs):
        return self.__synthmed_function__()(*args, **kwargs)

    def __synthmed_function__(self):
        module_name, _, function_name = self.__synthmed_call__.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # a dependency of the module is missing: say which
                raise
            raise ImportError(f"{self.__name__}(...) needs {module_name}, which is not part of this "
                              "installation yet") from None
        function = getattr(module, function_name, None)
        if not callable(function):
            raise ImportError(f"{self.__name__}(...) needs {module_name}.{function_name}(), which is not "
                              "part of this installation yet")
        return function


def make_callable(module_name: str, target: str) -> types.ModuleType:
    """Make the imported module ``module_name`` callable; a call runs ``target`` ("module:function")."""
    module = sys.modules[module_name]
    if not isinstance(module, CallableModule):
        module.__class__ = CallableModule
    module.__synthmed_call__ = target
    return module
