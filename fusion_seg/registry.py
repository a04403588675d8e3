"""Name -> class tables that classes join where they are defined (timm's ``register_model`` style).

``DECODERS`` and ``DATASETS`` are registries: a decoder or dataset module decorates its class with
``@DECODERS.register("name")``, importing the package imports every module, and the command line's
choices and help come from the tables. The registry refuses what is not a subclass of its base and a
name already taken by another class (re-importing the same class is fine).
"""
from __future__ import annotations

from typing import Callable, TypeVar

_T = TypeVar("_T", bound=type)


class Registry(dict):
    """``name -> class`` for subclasses of ``base``; ``kind`` names them in messages (``"decoder"``)."""

    def __init__(self, kind: str, base: type, on_register: Callable[[str, type], None] | None = None):
        super().__init__()
        self.kind, self.base, self.on_register = kind, base, on_register

    def register(self, name: str) -> Callable[[_T], _T]:
        """Class decorator: add the class to this registry as ``name``."""

        def add(cls: _T) -> _T:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"register_{self.kind}({name!r}) takes a {self.base.__name__} subclass, got {cls!r}")
            other = self.get(name)
            if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(f"{self.kind} name {name!r} is taken by {other.__module__}.{other.__qualname__}")
            if self.on_register is not None:
                self.on_register(name, cls)
            self[name] = cls
            return cls

        return add
