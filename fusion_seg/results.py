"""What a stage returns: a frozen dataclass that also reads as the plain mapping it replaced.

``evaluate`` and ``predict`` return typed results (their fields documented, checked by type checkers, shown
by ``help``), which still answer ``r["miou"]``, ``"iiou_class" in r`` and ``dict(r)``: their fields, and
the entries of an ``extra`` field (metrics only some datasets have, such as Cityscapes' iIoU), are the
mapping's keys. ``as_dict`` is what a JSON file gets.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import fields


class ResultMapping(Mapping):
    """Mixin for a frozen dataclass result: read-only mapping access to its fields and its ``extra`` entries."""

    def _keys(self) -> list[str]:
        names = [f.name for f in fields(self) if f.name != "extra"]
        return names + list(getattr(self, "extra", None) or {})

    def __getitem__(self, key: str):
        if key != "extra" and key in {f.name for f in fields(self)}:
            return getattr(self, key)
        extra = getattr(self, "extra", None) or {}
        if key in extra:
            return extra[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def as_dict(self) -> dict:
        return {k: self[k] for k in self}
