"""The stage graph: the one definition both the local runner and the Argo workflow are built from.

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


# memory: each stage's full-size peak (make bench-full, README "Full-size figures") is at most 70 % of it
STAGES: tuple[Stage, ...] = (
    Stage(
        name="plan",
        fanout="night",
        needs=(),
        entry="gppy_stage.stages.plan:run",
        help="Read the night's headers, classify frames, group calibration sets and stacks, write plan.json.",
        memory="512Mi",
    ),
    Stage(
        name="masters",
        fanout="calset",
        needs=("plan",),
        entry="gppy_stage.stages.masters:run",
        help="Combine one calibration set into master bias, darks and flats; add them to the master library.",
        gpu=True,
        cpu="2",
        memory="3584Mi",
    ),
    Stage(
        name="reduce",
        fanout="frame",
        needs=("masters",),
        entry="gppy_stage.stages.reduce:run",
        help="Bias, dark and flat correct one science frame, mask it and remove cosmic rays.",
        gpu=True,
        cpu="2",
        memory="4608Mi",
    ),
    Stage(
        name="astrometry",
        fanout="frame",
        needs=("reduce",),
        entry="gppy_stage.stages.astrometry:run",
        help="Solve one reduced frame's WCS: SExtractor, SCAMP against the local reference, MissFITS (solve-field as fallback).",
        cpu="1",
        memory="4Gi",
    ),
    Stage(
        name="photometry",
        fanout="frame",
        needs=("astrometry",),
        entry="gppy_stage.stages.photometry:run",
        help="Measure one solved frame with SExtractor and calibrate its zero points against Gaia XP synthetic photometry.",
        cpu="1",
        memory="4Gi",
    ),
    Stage(
        name="stack",
        fanout="stack",
        needs=("photometry",),
        entry="gppy_stage.stages.stack:run",
        help="SWarp one stack group's frames onto a common grid and zero point, then measure the stack.",
        cpu="2",
        memory="5Gi",
    ),
    Stage(
        name="subtract",
        fanout="stack",
        needs=("stack",),
        entry="gppy_stage.stages.subtract:run",
        help="Resample the reference frame onto the stack and subtract it (native engine, or HOTPANTS).",
        gpu=True,
        cpu="2",
        memory="5632Mi",
    ),
    Stage(
        name="detect",
        fanout="stack",
        needs=("subtract",),
        entry="gppy_stage.stages.detect:run",
        help="Find, flag and score transient candidates on the difference image; write regions and stamps.",
        cpu="2",
        memory="2560Mi",
    ),
    Stage(
        name="completeness",
        fanout="stack",
        needs=("subtract",),
        entry="gppy_stage.stages.completeness:run",
        help="Inject artificial stars of the stack's own PSF into a copy, subtract and search it again: CMPL50/CMPL90.",
        cpu="2",
        memory="3584Mi",
    ),
    Stage(
        name="curate",
        fanout="night",
        needs=("detect", "completeness"),
        entry="gppy_stage.stages.curate:run",
        help="Collect the night's products, write header snapshots and the night report (JSON and Markdown).",
        memory="512Mi",
    ),
    Stage(
        name="notify",
        fanout="night",
        needs=(),
        entry="gppy_stage.stages.notify:run",
        help="Post the night's outcome to Slack (the workflow's exit handler: it runs on failure too).",
        memory="256Mi",
        exit_handler=True,
        extra_args=("--status",),
    ),
)


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
