"""The stage graph: the one definition both the local runner and the Argo workflow are built from.
Its stages are listed in ``graph.yaml`` beside this file (name, fan-out, needs, entry, help, pod
resources); this module types and checks them and answers questions about them.

Each stage is a command ``gppy stage <name> --root URL --obs UNIT --night NIGHT [--<fanout> ID]``.
``fanout`` says what one invocation works on:

- ``night``:  once per night (no item argument)
- ``calset``: once per calibration set listed in plan.json's ``calsets``
- ``frame``:  once per science frame listed in plan.json's ``frames``
- ``stack``:  once per stack group listed in plan.json's ``stacks``

The plan stage writes each list's ids as an output (``--outputs-dir``), which Argo's ``withParam``
consumes; the local runner reads the same lists from plan.json. A test proves both agree.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

FANOUTS = ("night", "calset", "frame", "stack")
# plan.json key holding the items of each fan-out
PLAN_LISTS = {"calset": "calsets", "frame": "frames", "stack": "stacks"}
COMMON_ARGS = ("--root", "--obs", "--night")
# Options some stages take beyond the common ones (all optional strings), with their help.
EXTRA_ARGS = {
    "--status": "The workflow's outcome (Argo passes {{workflow.status}}: Succeeded, Failed, Error).",
}


@dataclass(frozen=True)
class Stage:
    name: str
    fanout: str
    needs: tuple[str, ...]
    entry: str  # "module:function", imported only when the stage runs
    help: str
    gpu: bool = False
    cpu: str = "1"
    memory: str = "2Gi"
    # stages of the same fan-out run one after another for each item (reduce -> astrometry ->
    # photometry for one frame); `needs` across fan-outs waits for the whole fan-out.
    exit_handler: bool = False
    extra_args: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if self.fanout not in FANOUTS:
            raise ValueError(f"stage {self.name}: unknown fanout {self.fanout!r}")
        unknown = set(self.extra_args) - set(EXTRA_ARGS)
        if unknown:
            raise ValueError(f"stage {self.name}: extra arguments {sorted(unknown)} have no entry in EXTRA_ARGS")

    @property
    def item_arg(self) -> str | None:
        """The option that names the item (``--frame``...), or None for per-night stages."""
        return None if self.fanout == "night" else f"--{self.fanout}"

    @property
    def args(self) -> tuple[str, ...]:
        return COMMON_ARGS + ((self.item_arg,) if self.item_arg else ()) + self.extra_args

    def function(self) -> Callable[..., dict]:
        module, _, func = self.entry.partition(":")
        return getattr(importlib.import_module(module), func)


def _load(path: Path = Path(__file__).with_name("graph.yaml")) -> tuple[Stage, ...]:
    """The stages of graph.yaml, each checked by Stage (an unknown key or fan-out is an error
    naming the stage)."""
    import yaml

    stages = []
    for row in yaml.safe_load(path.read_text()):
        row = dict(row)
        name = row.get("name", "?")
        try:
            stages.append(Stage(**row | {"needs": tuple(row.get("needs") or ()),
                                         "extra_args": tuple(row.get("extra_args") or ())}))
        except TypeError as exc:
            raise ValueError(f"{path}: stage {name}: {exc}") from exc
    return tuple(stages)


# the stage graph itself is data (graph.yaml, beside this file): what each stage is, what it needs
# and what its pod asks for; this module gives it its type and its checks
STAGES: tuple[Stage, ...] = _load()


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; stages are: {', '.join(s.name for s in STAGES)}")


def ordered() -> list[Stage]:
    """Stages in an order that respects ``needs`` (the order of STAGES, checked)."""
    seen: set[str] = set()
    for s in STAGES:
        missing = set(s.needs) - seen
        if missing:
            raise ValueError(f"stage {s.name} needs {sorted(missing)} which come later or do not exist")
        seen.add(s.name)
    return list(STAGES)
