"""The built-in data set builders, one file each, registered by name with their example writer
(:func:`relkd.data.kit.register_dataset`). Every module of this package is imported when
:mod:`relkd.data` is: a new builder file needs no edit anywhere else."""

import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
