"""The install split: ``pip install microseg`` (core) applies models, ``microseg[pipeline]``
trains, evaluates, tunes and registers, ``microseg[viewer]`` adds napari.

Static checks read pyproject.toml and uv.lock; the dynamic one imports the prediction path in
a fresh interpreter where every package of an extra is made unimportable, so a module-level
import of, say, MLflow or Lightning into inference fails here, not on a user's core install.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from microseg.errors import MissingExtraError
from microseg.utils.extras import EXTRA_OF, missing_extra, require

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
#: what a core install must never need to apply a model
PIPELINE_ONLY = {"dvc", "mlflow", "optuna", "optuna-integration", "great-expectations", "lightning"}
#: what ``microseg predict``/``fuse --input``/``visualize`` and ``microseg.load`` import before
#: a model loads
PREDICT_PATH = (
    "microseg",
    "microseg.api",
    "microseg.cli",
    "microseg.stages.predict",
    "microseg.stages.predict_inputs",
    "microseg.stages.predict_models",
    "microseg.stages.predict_result",
    "microseg.stages.predict_runner",
    "microseg.stages.spines",
    "microseg.registry.resolve",
    "microseg.models",
    "microseg.models.classical",
    "microseg.infer.spine_pipeline",
    "microseg.infer.yolo_predict",
    "microseg.infer.tracking",
    "microseg.io.bioformats",
    "microseg.io.exports",
)
#: what loading a trained model imports: every family's façade, network and predictor
FAMILIES = ("unet", "punet", "maunet", "lstmunet", "sac", "nnunet", "maskrcnn", "yolo")
MODEL_PATH = (
    "microseg.stages.punet",
    "microseg.models.sac.network",
    *(f"microseg.models.{family}" for family in FAMILIES),
    *(f"microseg.models.{f}.predict" for f in ("unet", "punet", "maunet", "lstmunet", "maskrcnn")),
)


def _dist(requirement: str) -> str:
    """``"dvc>=3.50,<4"`` -> ``dvc`` (PEP 503 normalised)."""
    name = re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def test_core_holds_no_pipeline_package() -> None:
    core = {_dist(d) for d in PROJECT["dependencies"]}
    pipeline = {_dist(d) for d in EXTRAS["pipeline"]}
    assert pipeline >= PIPELINE_ONLY
    assert not core & pipeline, core & pipeline
    assert {"torch", "torchvision", "ultralytics", "monai", "bioio"} <= core
    assert [_dist(d) for d in EXTRAS["viewer"]] == ["napari"]
    assert [_dist(d) for d in EXTRAS["scale"]] == ["ray"]
    assert EXTRAS["all"] == ["microseg[pipeline,viewer,scale]"]


def test_core_does_not_pull_the_pipeline_in_through_the_lock() -> None:
    """The core's dependency closure in uv.lock (markers ignored: the widest it can be)
    reaches no package of the pipeline or viewer extras."""
    lock = tomllib.loads((REPO / "uv.lock").read_text())["package"]
    deps: dict[str, set[str]] = {}
    for pkg in lock:
        deps.setdefault(pkg["name"], set()).update(d["name"] for d in pkg.get("dependencies", []))
    me = next(p for p in lock if p["name"] == "microseg")
    seen: set[str] = set()
    todo = [d["name"] for d in me["dependencies"]]
    while todo:
        if (name := todo.pop()) not in seen:
            seen.add(name)
            todo.extend(deps.get(name, ()))
    assert {_dist(d) for d in PROJECT["dependencies"]} <= seen
    extras = {
        d["name"]
        for extra in ("pipeline", "viewer", "scale")
        for d in me["optional-dependencies"][extra]
    }
    assert not seen & extras, f"the core install pulls in {sorted(seen & extras)}"
    assert not {"sqlalchemy", "alembic", "torchmetrics", "pyarrow"} & seen


def test_extra_table_matches_pyproject() -> None:
    """Every import name in ``EXTRA_OF`` comes from a distribution of that extra (as this
    environment, made with all extras, installed it), and every extra's distribution is there."""
    providers = {
        top: {re.sub(r"[-_.]+", "-", d).lower() for d in dists}
        for top, dists in packages_distributions().items()
    }
    for module, extra in EXTRA_OF.items():
        wanted = {_dist(d) for d in EXTRAS[extra]}
        assert providers.get(module, set()) & wanted, f"{module}: not from the {extra} extra"
    for extra in ("pipeline", "viewer", "scale"):
        for dist in map(_dist, EXTRAS[extra]):
            tops = {top for top, dists in providers.items() if dist in dists}
            assert any(EXTRA_OF.get(t) == extra for t in tops), f"{dist} ({tops}) not in EXTRA_OF"
    core = {_dist(d) for d in PROJECT["dependencies"]}
    assert not {m for m in EXTRA_OF if providers[m] & core}, "a core package is in EXTRA_OF"


def test_require_and_missing_extra() -> None:
    assert require("pipeline", "json") is json
    with pytest.raises(MissingExtraError, match=r"pip install 'microseg\[pipeline\]'") as info:
        require("pipeline", "microseg_no_such_package")
    assert isinstance(info.value, ImportError)  # `except ImportError` fallbacks still work
    error = missing_extra(ModuleNotFoundError("No module named 'mlflow'", name="mlflow.pyfunc"))
    assert str(error) == (
        "this needs the pipeline extra (mlflow is not installed): pip install 'microseg[pipeline]'"
    )
    assert "microseg[viewer]" in str(missing_extra(ModuleNotFoundError(name="napari")))
    # a missing core package is a broken install, not a missing extra
    assert missing_extra(ModuleNotFoundError(name="numpy")) is None
    assert missing_extra(ImportError("cannot import name 'x' from 'mlflow'", name="mlflow")) is None


# ------------------------------------------------------------------ module-level imports


def _source(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    return next((p for p in (base / "__init__.py", base.with_suffix(".py")) if p.is_file()), None)


def _import_time_imports(module: str) -> set[str]:
    """Modules that importing ``module`` imports: its statements outside functions (class
    bodies and module-level ``try``/``if`` run at import; ``if TYPE_CHECKING:`` does not),
    each with its parent packages, and ``from package import submodule`` resolved."""
    found: set[str] = set()

    def add(name: str) -> None:
        parts = name.split(".")
        found.update(".".join(parts[: i + 1]) for i in range(len(parts)))

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name)
            elif isinstance(node, ast.ImportFrom) and node.module:
                add(node.module)
                for alias in node.names:
                    if _source(sub := f"{node.module}.{alias.name}"):
                        add(sub)
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ExceptHandler):
                    visit(child.body)
            for attr in ("body", "orelse", "finalbody"):
                visit(getattr(node, attr, None) or [])

    path = _source(module)
    assert path is not None, f"no source for {module}"
    visit(ast.parse(path.read_text()).body)
    return found


def _closure(modules: tuple[str, ...]) -> dict[str, str]:
    """Every module imported (transitively through microseg's own modules) when ``modules``
    are, mapped to the microseg module that first imports it."""
    via: dict[str, str] = {}
    todo = list(modules)
    while todo:
        module = todo.pop()
        for name in _import_time_imports(module):
            if name not in via and name not in modules:
                via[name] = module
                if name.split(".")[0] == "microseg" and _source(name):
                    todo.append(name)
    return via


@pytest.mark.parametrize("path", [PREDICT_PATH, MODEL_PATH], ids=["predict", "models"])
def test_no_module_level_import_of_an_extra_on_the_prediction_path(path) -> None:
    via = _closure(path)
    bad = {name: where for name, where in via.items() if name.split(".")[0] in EXTRA_OF}
    assert not bad, f"imported at module level (module -> by): {bad}"
    # the walk does follow the package: the predictors' own heavy imports are seen
    assert {"torch", "monai", "microseg.models.unet.network"} <= set(_closure(MODEL_PATH))


def test_the_import_walk_sees_what_a_pipeline_module_imports() -> None:
    via = _closure(("microseg.stages.registry", "microseg.models.unet.train"))
    assert "mlflow" in via and "lightning" in via


# ------------------------------------------------------------------ a core install, simulated

_CORE_ONLY = """
import contextlib, importlib, importlib.abc, io, json, sys

config = json.loads(sys.argv[1])
BLOCKED = set(config["blocked"])

class Uninstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Uninstalled())
report = {}
for module in config["modules"]:
    importlib.import_module(module)

import numpy as np
import microseg
from microseg.cli import main
from microseg.errors import MissingExtraError
from microseg.models import get_model
from PIL import Image

def cli(*args):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["microseg", *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}

image = np.zeros((48, 48), np.uint8)
image[8:20, 8:20] = image[28:42, 26:40] = 200
report["objects"] = int(get_model("classical").load(None).as_predictor()(image)[0].max())
try:
    microseg.load("models:/microseg-nuclei@champion")
except MissingExtraError as exc:
    report["registry"] = str(exc)
report["help"] = cli("--help")
report["version"] = cli("--version")
report["where"] = cli("where")

tmp = config["tmp"]
Image.fromarray(image).save(f"{tmp}/two.png")
for i, model in enumerate(config["predict"]):
    api = microseg.load(model, device="cpu").predict(image).labels
    run = cli("predict", f"{tmp}/two.png", "--model", model, "--out", f"{tmp}/{i}")
    run["api_objects"] = int(api.max())
    run["csv"] = open(f"{tmp}/{i}/two_objects.csv").read() if run["code"] == 0 else ""
    report[model] = run
report["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps(report))
"""


def _core_only(tmp: Path, modules: tuple[str, ...], predict: tuple[str, ...] = ()) -> dict:
    """Run :data:`_CORE_ONLY` in a fresh interpreter where no package of an extra imports;
    ``predict``: models that ``microseg.load(...).predict`` and ``microseg predict`` run."""
    config = {"blocked": list(EXTRA_OF), "modules": modules, "tmp": str(tmp), "predict": predict}
    env = {**os.environ, "MPLBACKEND": "Agg", "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _CORE_ONLY, json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def core_only(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _core_only(tmp_path_factory.mktemp("core"), PREDICT_PATH)


def test_prediction_path_imports_no_extra(core_only: dict) -> None:
    assert core_only["loaded"] == []
    assert core_only["objects"] == 2  # the classical predictor: two squares


def test_registry_uri_says_which_extra(core_only: dict) -> None:
    assert core_only["registry"] == (
        "this needs the pipeline extra (mlflow is not installed): pip install 'microseg[pipeline]'"
    )


def test_cli_help_and_version_without_extras(core_only: dict) -> None:
    assert core_only["help"]["code"] == 0
    assert "predict" in core_only["help"]["out"]
    assert core_only["version"]["code"] == 0
    assert core_only["version"]["out"].startswith("microseg ")


def test_pipeline_command_says_which_extra_in_one_line(core_only: dict) -> None:
    where = core_only["where"]
    assert where["code"] == 2
    assert where["err"].strip() == (
        "error: this needs the pipeline extra (mlflow is not installed): "
        "pip install 'microseg[pipeline]'"
    )


@pytest.mark.slow
def test_models_predict_without_extras(tmp_path: Path) -> None:
    """``microseg.load(...).predict`` and ``microseg predict`` with the otsu baseline and a
    saved U-Net, every family's modules imported (torch and monai load in the fresh
    interpreter: about 40 s on two busy cores)."""
    from microseg.models import get_model

    unet = tmp_path / "unet.pt"
    get_model("unet").build(arch="unet", features=[4, 8, 16], post={"min_size": 2}).save(unet)
    report = _core_only(tmp_path, PREDICT_PATH + MODEL_PATH, ("otsu", str(unet)))
    assert report["loaded"] == []
    for model in ("otsu", str(unet)):
        run = report[model]
        assert run["code"] == 0, run["err"]
        n = run["api_objects"]
        assert len(run["csv"].strip().splitlines()) == 1 + n  # the CLI's table: one row each
    assert report["otsu"]["api_objects"] == 2
