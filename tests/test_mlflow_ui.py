"""The MLflow UI shows what the pipeline registered: a browser test against `mlflow server`.

A real ``mlflow server`` on loopback, a store filled through its REST API the way the pipeline
fills the team server (a run with metrics, two versions of ``microseg-spines``: ``champion``
and ``challenger``), then headless Chromium (Debian's ``chromium`` driven by ``playwright-core``
from ``.tools/``; ``make tools`` installs both) opens the registered model page and the run page.
Screenshots land in ``reports/ui/``. Without node, playwright-core or chromium the test skips and
says which one is missing. The browser test costs about a minute of CPU (two mlflow imports in the
server, the browser), so it is ``slow``; its fast twin in ``make test`` reads the same ajax routes
the two pages read, in-process, without a browser.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOOLS = REPO / ".tools"
PLAYWRIGHT = TOOLS / "node_modules" / "playwright-core"
SCREENSHOTS = REPO / "reports" / "ui"
MODEL = "microseg-spines"
SERVER_START_S = 240  # mlflow imports slowly on a loaded 2-core machine
# Flags from the machine notes: no background connections out of a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

UI_JS = r"""
const [playwright, chromiumPath, argsJson, jobJson] = process.argv.slice(1);
const { chromium } = require(playwright);
const job = JSON.parse(jobJson);
(async () => {
  const browser = await chromium.launch({
    executablePath: chromiumPath, args: JSON.parse(argsJson), headless: true,
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const out = {};
  for (const view of job.views) {
    await page.goto(job.base + view.path);
    await page.getByText(view.wait_for, { exact: false }).first()
      .waitFor({ timeout: job.timeout_ms });
    const target = page.getByText(view.scroll_to, { exact: false }).first();
    await target.scrollIntoViewIfNeeded();
    await page.waitForTimeout(300);  // let the table settle before the picture
    await page.screenshot({ path: view.screenshot });
    const rows = await page.locator('[role="row"], tr').allInnerTexts();
    out[view.name] = { body: await page.innerText("body"), rows };
  }
  await browser.close();
  process.stdout.write(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(3); });
"""


def _pinned_playwright() -> str:
    pin = re.search(r"^PLAYWRIGHT_NPM := (\S+)", (REPO / "Makefile").read_text(), re.M)
    return pin[1] if pin else "playwright-core"


def _chromium() -> str | None:
    for name in (os.environ.get("MICROSEG_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="module")
def browser() -> tuple[str, str]:
    """(node, chromium) once playwright-core is in .tools; skips with the reason otherwise."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        pytest.skip("node is not installed (needed to drive chromium with playwright-core)")
    if not (PLAYWRIGHT / "package.json").exists():
        if npm is None:
            pytest.skip("npm is not installed, so playwright-core cannot be (run `make tools`)")
        install = [npm, "install", "--prefix", str(TOOLS), "--save-exact", "--no-audit"]
        proc = subprocess.run(
            [*install, _pinned_playwright()],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            pytest.skip(f"npm could not install playwright-core (offline?): {proc.stderr[-300:]}")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed: `make tools` as root runs apt-get install chromium")
    return node, chromium


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server not up after {SERVER_START_S} s:\n{log.read_text()[-2000:]}")


@pytest.fixture()
def server_for(tmp_path: Path) -> Iterator:
    """``start(db_path) -> url``: `mlflow server` on loopback over a SQLite store."""
    procs: list[subprocess.Popen] = []

    def start(db: Path) -> str:
        port = _free_port()
        log = tmp_path / f"server-{port}.log"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}"]
        cmd += ["--default-artifact-root", str(tmp_path / "artifacts")]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        with log.open("w") as fh:
            proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        _wait_up(url, proc, log)
        return url

    yield start
    for proc in procs:  # the server and the uvicorn worker it started share a session
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _drive(browser: tuple[str, str], base: str, views: list[dict]) -> dict:
    node, chromium = browser
    job = {"base": base, "views": views, "timeout_ms": 120_000}
    args = [str(PLAYWRIGHT), chromium, json.dumps(CHROMIUM_ARGS), json.dumps(job)]
    proc = subprocess.run(
        [node, "-e", UI_JS, "--", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"browser run failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def _row(rows: list[str], version: int) -> str:
    found = [r for r in rows if re.search(rf"\bVersion {version}\b", r)]
    assert found, f"no row for Version {version} in {rows}"
    return found[0]


def _keep(src: Path, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    dst = SCREENSHOTS / name
    shutil.copy2(src, dst)
    return dst


RUNS = {"eval_yolo-good": 0.8125, "eval_yolo-worse": 0.6875}  # benchmark.f1 of each run


def _fill_store(client) -> tuple[str, dict[str, str]]:
    """What register/promote leave behind: version 1 `champion`, version 2 `challenger`."""
    exp = client.create_experiment("microseg-spines")
    runs = {}
    for name, f1 in RUNS.items():
        run = client.create_run(exp, run_name=name)
        client.log_metric(run.info.run_id, "benchmark.f1", f1)
        client.log_metric(run.info.run_id, "benchmark.precision", 0.9375)
        client.set_terminated(run.info.run_id)
        runs[name] = run.info.run_id
    client.create_registered_model(MODEL)
    for run_id in runs.values():
        client.create_model_version(MODEL, f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias(MODEL, "champion", "1")
    client.set_registered_model_alias(MODEL, "challenger", "2")
    return exp, runs


def test_ui_backend_serves_aliases_and_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fast twin of the browser test (no server process, no browser): the UI bundle is served
    and the ajax routes the model and run pages read carry the aliases and metrics."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.server import app, handlers

    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp, runs = _fill_store(MlflowClient(tracking_uri=uri, registry_uri=uri))
    # The server's own store factories, handed in directly: its lazy getters would also set
    # the process-wide tracking/registry URIs, which would leak into later tests.
    tracking = handlers._tracking_store_registry.get_store(uri, str(tmp_path / "artifacts"))
    monkeypatch.setattr(handlers, "_tracking_store", tracking)
    monkeypatch.setattr(
        handlers, "_model_registry_store", handlers._model_registry_store_registry.get_store(uri)
    )
    web = app.test_client()

    index = web.get("/")
    assert index.status_code == 200 and b'id="root"' in index.data
    model = web.get("/ajax-api/2.0/mlflow/registered-models/get", query_string={"name": MODEL})
    aliases = {a["alias"]: a["version"] for a in model.get_json()["registered_model"]["aliases"]}
    assert aliases == {"champion": "1", "challenger": "2"}
    champion = web.get(
        "/ajax-api/2.0/mlflow/registered-models/alias",
        query_string={"name": MODEL, "alias": "champion"},
    ).get_json()["model_version"]
    assert champion["run_id"] == runs["eval_yolo-good"]
    run = web.get("/ajax-api/2.0/mlflow/runs/get", query_string={"run_id": champion["run_id"]})
    metrics = {m["key"]: m["value"] for m in run.get_json()["run"]["data"]["metrics"]}
    assert metrics == {"benchmark.f1": 0.8125, "benchmark.precision": 0.9375}
    assert run.get_json()["run"]["info"]["experiment_id"] == exp
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before


@pytest.mark.slow
def test_registered_model_page_shows_champion_and_run_metrics(
    browser, server_for, tmp_path: Path
) -> None:
    """Headless Chromium on `mlflow server`: ~60 s of CPU (two mlflow imports, the browser)."""
    url = server_for(tmp_path / "mlflow.db")
    from mlflow import MlflowClient

    exp, runs = _fill_store(MlflowClient(tracking_uri=url, registry_uri=url))

    model_png, run_png = tmp_path / "model.png", tmp_path / "run.png"
    seen = _drive(
        browser,
        url,
        [
            {
                "name": "model",
                "path": f"/#/models/{MODEL}",
                "wait_for": "champion",
                "scroll_to": "Aliases",
                "screenshot": str(model_png),
            },
            {
                "name": "run",
                "path": f"/#/experiments/{exp}/runs/{runs['eval_yolo-good']}",
                "wait_for": "benchmark.f1",
                "scroll_to": "benchmark.precision",
                "screenshot": str(run_png),
            },
        ],
    )
    _keep(model_png, "mlflow_model_champion.png")
    _keep(run_png, "mlflow_run_metrics.png")

    rows = seen["model"]["rows"]
    assert "champion" in _row(rows, 1) and "challenger" not in _row(rows, 1)
    assert "challenger" in _row(rows, 2) and "champion" not in _row(rows, 2)
    body = seen["run"]["body"]
    assert re.search(r"benchmark\.f1\s+0\.8125\b", body), body[-1500:]
    assert re.search(r"benchmark\.precision\s+0\.9375\b", body), body[-1500:]
    assert "0.6875" not in body  # the other run's number is not on this run's page
    assert model_png.stat().st_size > 10_000  # a rendered page, not a blank image


def _demo_champion(db: Path) -> tuple[str, str] | None:
    """(model name, run id) of a `champion` alias in a demo store, if there is one."""
    if not db.exists():
        return None
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = con.execute(
            "SELECT a.name, v.run_id FROM registered_model_aliases a JOIN model_versions v"
            " ON a.name = v.name AND a.version = v.version WHERE a.alias = 'champion'"
        ).fetchone()
    except sqlite3.Error:
        return None
    finally:
        con.close()
    return (row[0], row[1]) if row and row[1] else None


@pytest.mark.slow
def test_demo_store_champion_in_ui(browser, server_for, tmp_path: Path) -> None:
    """The same check on a copy of the demo's own store (`make demo` first; MICROSEG_UI_STORE
    names another SQLite store)."""
    store = Path(os.environ.get("MICROSEG_UI_STORE", REPO / "mlflow.db"))
    found = _demo_champion(store)
    if found is None:
        pytest.skip(f"no store with a `champion` alias at {store} (run `make demo`)")
    name, run_id = found
    db = tmp_path / "demo.db"
    shutil.copy2(store, db)
    url = server_for(db)
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=url, registry_uri=url).get_run(run_id)
    assert run.data.metrics, f"the champion's run {run_id} logged no metrics"
    metric, value = sorted(run.data.metrics.items())[0]
    png = tmp_path / "demo_model.png"
    seen = _drive(
        browser,
        url,
        [
            {
                "name": "model",
                "path": f"/#/models/{name}",
                "wait_for": "champion",
                "scroll_to": "Aliases",
                "screenshot": str(png),
            },
            {
                "name": "run",
                "path": f"/#/experiments/{run.info.experiment_id}/runs/{run_id}",
                "wait_for": metric,
                "scroll_to": metric,
                "screenshot": str(tmp_path / "demo_run.png"),
            },
        ],
    )
    _keep(png, "mlflow_demo_model_champion.png")
    assert any("champion" in r for r in seen["model"]["rows"])
    assert metric in seen["run"]["body"]
    assert f"{value:.4g}"[:4] in seen["run"]["body"]
