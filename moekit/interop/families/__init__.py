"""The Hugging Face families moekit reads and writes, one adapter per file, registered in
:data:`FAMILIES` by ``model_type``. Every module in this folder is imported here, so adding
a family is adding its file (see ``base.py`` for what an adapter provides)."""

import importlib
import pkgutil

from moekit.interop.families.base import FAMILIES, Family, field, layered, register_family

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["FAMILIES", "Family", "field", "layered", "register_family"]
