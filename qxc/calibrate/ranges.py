"""The calibration result: a typed, JSON-serialisable map from tensor name to its [lo, hi] range."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from qxc.errors import UsageError

SCHEMA = "qxc.ranges/1"


@dataclass
class Ranges:
    method: str
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: int = 0
    settings: dict = field(default_factory=dict)
    infinite: set[str] = field(default_factory=set)  # tensors that held +-inf or NaN (their range: the finite values)

    def __getitem__(self, name: str) -> tuple[float, float]:
        return self.ranges[name]

    def __contains__(self, name: str) -> bool:
        return name in self.ranges

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "method": self.method, "samples": self.samples, "settings": self.settings,
                "ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in sorted(self.ranges.items())},
                "infinite": sorted(self.infinite)}

    @classmethod
    def from_json(cls, doc: dict, source: str = "<ranges>") -> Ranges:
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise UsageError(f"{source}: not a qxc ranges file (expected schema '{SCHEMA}')")
        try:
            ranges = {k: (float(v[0]), float(v[1])) for k, v in doc["ranges"].items()}
        except (KeyError, TypeError, ValueError, IndexError):
            raise UsageError(f"{source}: malformed 'ranges' (want name: [lo, hi])") from None
        bad = [k for k, (lo, hi) in ranges.items() if not lo <= hi]
        if bad:
            raise UsageError(f"{source}: range of '{bad[0]}' has lo > hi")
        infinite = doc.get("infinite", [])
        if not isinstance(infinite, list) or not all(isinstance(k, str) for k in infinite):
            raise UsageError(f"{source}: malformed 'infinite' (want a list of tensor names)")
        return cls(doc.get("method", "unknown"), ranges, int(doc.get("samples", 0)), dict(doc.get("settings", {})),
                   set(infinite))

    def save(self, path: str | os.PathLike) -> None:
        from qxc.ir import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Ranges:
        from qxc.ir import read_json

        return cls.from_json(read_json(path, "a ranges file from save-ranges or qxc calibrate"), str(path))
