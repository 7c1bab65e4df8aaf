"""Golden CLI output: what each ``microseg`` command echoes, masked, must not change by accident.

The commands run in order through typer's ``CliRunner`` on :data:`microseg.cli.app` inside
one temporary working directory with a tiny ``params.yaml`` (tiny synthetic data, tiny
networks, one thread), each on the outputs of the ones before, as ``dvc repro`` chains them.
Each command's **stdout** (not stderr: progress bars and log lines live there) is normalised
by :func:`normalise` and compared with ``tests/data/cli_golden/<name>.txt``; ``help.txt``
holds ``microseg --help``'s panels and their commands, in order.

Normalisation (so that outputs compare across machines, runs and seeds):

* the working directory (resolved or not) -> ``<tmp>``;
* every decimal number (``0.731``, ``1e-05``, ``nan``) -> ``<num>``; integers stay
  (counts of samples, stacks or marks are part of the contract on fixed tiny data);
* trailing whitespace is dropped.

A deliberate change of output is one command::

    MICROSEG_REGOLD=1 python -m pytest tests/cli/test_output_golden.py -m "not gpu"

Only commands that need seconds are in :data:`STEPS` (the list says which are not, and why);
a step added with ``slow=True`` is marked slow.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from tests.tiny_segmenters import tiny_train
from typer.testing import CliRunner

from microseg.cli import PANELS, app

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "data" / "cli_golden"
REGOLD = os.environ.get("MICROSEG_REGOLD") == "1"

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: a decimal number not inside a word or a dotted run (``127.0.0.1``, ``v1.2.3`` stay)
_NUM = re.compile(
    r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+(?=e[-+]?\d))(?:e[-+]?\d+)?(?!\.?\d)|\bnan\b"
)


def normalise(text: str, workdir: Path) -> str:
    """Mask the temporary directory and decimal numbers; see the module docstring."""
    for root in sorted({str(workdir.resolve()), str(workdir)}, key=len, reverse=True):
        text = text.replace(root, "<tmp>")
    text = _NUM.sub("<num>", text)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def tiny_params() -> dict:
    """The repo's params.yaml scaled down to seconds per stage (same keys, smaller values)."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["synth"]["spines"].update(
        n_train=1, n_val=1, shape=[8, 64, 64], benchmark_shape=[8, 96, 96], n_batch=1
    )
    p["synth"]["tracking"].update(n_sequences=3, n_frames=5, shape=[48, 48])
    p["yolo"]["train"].update(epochs=1, imgsz=64, batch=4)
    p["yolo"]["sweep"].update(confs=[0.01, 0.1], ious=[0.5])
    p["baseline_log"]["grid"] = {"threshold": [0.1, 0.2], "min_sigma": [1.5], "max_sigma": [3.0]}
    p["punet"]["train"].update(
        filters=[4, 8], latent_filters=[4, 8], dual_decoder=False, head_convs=2,
        epochs=1, steps_per_epoch=2, patch_size=32, batch_size=2, val_every=1,
    )  # fmt: skip
    p["punet"]["predict"].update(n_samples=2, batch_planes=4)
    p["fusion"].update(n_trials=4)  # storage: sqlite:///optuna.db in the workdir
    segs = p["tracking"]["segmenters"]
    extras = {"num_threads": 1, "device": "cpu", "progress": False}
    segs["unet"]["train"] = tiny_train("unet", **extras)
    segs["lstmunet"]["train"] = tiny_train("lstmunet", val_max_frames=2, **extras)
    segs["maunet"]["train"] = tiny_train("maunet", **extras)
    return p


def write_noise_stack(path: Path) -> None:
    from microseg.io.tiff import write_stack

    rng = np.random.default_rng(1)
    stack = rng.normal(300, 40, (4, 48, 48))
    stack[1, 20:26, 30:36] += 2000
    write_stack(path, np.clip(stack, 0, 65535).astype(np.uint16), (500.0, 94.0, 94.0))


def write_boxes(path: Path) -> None:
    pd.DataFrame(
        {"z": [1, 3], "x1": [4, 10], "y1": [4, 12], "x2": [12, 20], "y2": [10, 22],
         "score": [0.9, 0.4]}
    ).to_csv(path, index=False)  # fmt: skip


@dataclass(frozen=True)
class Step:
    name: str  # golden file stem
    args: list[str]
    prepare: Callable[[Path], None] | None = None  # inputs beyond earlier steps' outputs
    slow: bool = False


def _visual_inputs(root: Path) -> None:
    write_noise_stack(root / "inputs" / "stack.tif")
    write_boxes(root / "inputs" / "boxes.csv")


#: in pipeline order; a step may use what the steps before it wrote
STEPS: list[Step] = [
    Step("synth_spines", ["synth", "spines"]),
    Step("synth_tracking", ["synth", "tracking"]),
    Step("ingest_spines", ["ingest", "spines"]),
    Step("ingest_tracking", ["ingest", "tracking"]),
    Step("validate_spines", ["validate", "spines"]),
    Step("validate_tracking", ["validate", "tracking"]),
    Step("convert_yolo", ["convert", "yolo"]),
    Step("evaluate_log", ["evaluate", "--model", "log"]),
    Step("train_punet", ["train", "--model", "punet"]),
    Step("evaluate_punet", ["evaluate", "--model", "punet"]),
    Step("uncertainty", ["uncertainty"]),
    Step("inter_rater", ["inter-rater"]),
    Step(
        "predict_punet",
        ["predict", "inputs/stack.tif", "--out", "pred", "--model", "punet"],
        _visual_inputs,
    ),
    Step("visualize", ["visualize", "inputs/stack.tif", "inputs/boxes.csv", "--out", "vis"]),
    Step("train_tracking_seg", ["train", "--model", "tracking_seg@unet"]),
    Step("train_tracking_seg_lstmunet", ["train", "--model", "tracking_seg@lstmunet"]),
    Step("train_tracking_seg_maunet", ["train", "--model", "tracking_seg@maunet"]),
    Step("track", ["track"]),
    Step("evaluate_tracking", ["evaluate", "--task", "tracking"]),
    Step("where", ["where"]),
    # not covered (minutes on a CPU, or inputs no tiny run makes): train/evaluate -m yolo and
    # what stands on YOLO (tune --target fusion, fuse, compare-spines, register/promote
    # --task spines, batch-eval), the nuclei chain on DSB (ingest dsb2018, prepare-targets,
    # train/evaluate cells, report) and tune --target yolo|punet. Add one as
    # Step(..., slow=True) and write its golden file with MICROSEG_REGOLD=1.
]


@dataclass
class Pipeline:
    """Runs :data:`STEPS` lazily and in order in one working directory."""

    root: Path
    done: dict[str, tuple[int, str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    def output(self, name: str) -> tuple[int, str]:
        for step in STEPS:
            if step.name not in self.done:
                self._run(step)
            if step.name == name:
                return self.done[name]
        raise KeyError(name)

    def _run(self, step: Step) -> None:
        if step.prepare is not None:
            step.prepare(self.root)
        t0, c0 = time.perf_counter(), time.process_time()
        args = step.args if step.args[0] == "visualize" else [*step.args, "-p", "params.yaml"]
        res = CliRunner().invoke(app, args)  # visualize is the one command without --params
        self.seconds[step.name] = time.perf_counter() - t0
        self.cpu_seconds[step.name] = time.process_time() - c0
        if res.exit_code != 0:
            detail = f"{res.output}\n{res.exception!r}"
            raise AssertionError(f"microseg {' '.join(step.args)} failed: {detail}")
        self.done[step.name] = (res.exit_code, normalise(res.stdout, self.root))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    root = tmp_path_factory.mktemp("cli_golden")
    p = tiny_params()
    root_s = str(root)
    p["mlflow"].update(tracking_uri=f"sqlite:///{root_s}/mlflow.db", artifact_root="mlruns")
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(root)
        pipe = Pipeline(root)
        yield pipe
    print("wall s per command:", {k: round(v, 1) for k, v in pipe.seconds.items()})
    print("CPU s per command:", {k: round(v, 1) for k, v in pipe.cpu_seconds.items()})


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if REGOLD:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.is_file(), f"no golden file {path}; run with MICROSEG_REGOLD=1 to write it"
    assert text == path.read_text(), f"`{name}` output changed; MICROSEG_REGOLD=1 to accept"


def test_help_lists_every_command_in_order() -> None:
    res = CliRunner().invoke(app, ["--help"], terminal_width=100, env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    # each command panel as `[title]`, then its names, one per line (rich boxes, help text
    # and the Options panel stripped)
    body = res.stdout.split("╭─ Options ", 1)[1].split("╰", 1)[1]
    found = re.finditer(r"^╭─ (.+?) ─|^│ ([a-z][a-z-]*)\s", body, re.MULTILINE)
    lines = [f"[{m.group(1)}]" if m.group(1) else m.group(2) for m in found]
    assert len(lines) > len(PANELS), res.stdout
    check_golden("help", "\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "name",
    [pytest.param(s.name, marks=pytest.mark.slow) if s.slow else s.name for s in STEPS],
)
def test_command_output_matches_golden(name: str, pipeline: Pipeline) -> None:
    _, text = pipeline.output(name)
    check_golden(name, text)
