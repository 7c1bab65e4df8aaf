"""`microseg uncertainty STACK` and `microseg inter-rater --stack --rater ...` on files that
are not the pipeline's: every map written with the right shape, and user mistakes as one
`error:` line naming the file, exit 2."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from microseg.io.tiff import read_stack, write_stack

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (4, 32, 32)
MAPS = ("mean", "variance", "entropy", "mutual_information", "expected_entropy")


def run_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    import microseg.cli as cli
    from microseg.cli import main

    monkeypatch.setattr(cli, "_log_files", False)
    monkeypatch.setattr(sys, "argv", ["microseg", *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    captured = capsys.readouterr()
    return int(exit_.value.code or 0), captured.out, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_punet_and_stack) -> Path:
    root = tmp_path_factory.mktemp("unc_cli")
    stack, rng = tiny_punet_and_stack(root, SHAPE)
    nan_stack = stack.astype(np.float32)
    nan_stack[2, 5, 5] = np.nan
    write_stack(root / "nan.tif", nan_stack)
    write_stack(root / "flat.tif", stack[0].astype(np.uint16))  # a 2D image
    truth = np.zeros(SHAPE, np.uint8)
    truth[1:3, 8:14, 8:14] = 1
    for i, name in enumerate("ab"):
        write_stack(root / f"{name}.tif", np.roll(truth, i, axis=2))
    write_stack(root / "small.tif", truth[:, :16])
    write_stack(root / "labels.tif", truth * rng.integers(1, 4, SHAPE).astype(np.uint8))
    return root


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MICROSEG_DEBUG", raising=False)
    torch.set_num_threads(1)
    return tmp_path


def _fast(files: Path) -> list[str]:
    return [
        "--weights",
        str(files / "punet.pt"),
        "--samples",
        "3",
        "-S",
        "punet.predict.batch_planes=4",
    ]


def test_uncertainty_writes_every_map(files: Path, workdir: Path, monkeypatch, capsys) -> None:
    code, out, err = run_main(
        ["uncertainty", str(files / "stack.tif"), "--temperature", "1.4", *_fast(files)],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    folder = workdir / "reports" / "uncertainty" / "stack"  # the default: named after the stack
    assert str(folder.relative_to(workdir)) in out
    for head in ("spine", "dendrite"):
        maps = {name: read_stack(folder / f"{head}_{name}.tif") for name in MAPS}
        for name, arr in maps.items():
            assert arr.shape == SHAPE and arr.dtype == np.float32, name
            assert np.isfinite(arr).all(), name
        # total = epistemic + aleatoric wherever MI was not clipped at 0
        np.testing.assert_allclose(
            maps["entropy"], maps["mutual_information"] + maps["expected_entropy"], atol=1e-5
        )
        assert (folder / f"panel_{head}.png").stat().st_size > 0
    meta = json.loads((folder / "uncertainty.json").read_text())
    assert meta["n_samples"] == 3 and meta["temperature"] == 1.4 and meta["planes"] == [0, 4]


def test_uncertainty_planes(files: Path, workdir: Path, monkeypatch, capsys) -> None:
    out = workdir / "sel"
    args = ["uncertainty", str(files / "stack.tif"), "--planes", "1:3", "--out", str(out)]
    code, _, err = run_main([*args, *_fast(files)], monkeypatch, capsys)
    assert code == 0, err
    for name in MAPS:
        arr = read_stack(out / f"spine_{name}.tif")
        assert arr.shape == (2, *SHAPE[1:]) and np.isfinite(arr).all()


def test_inter_rater_without_model(files: Path, workdir: Path, monkeypatch, capsys) -> None:
    out = workdir / "ir"
    args = ["inter-rater", "--stack", str(files / "stack.tif"), "--out", str(out)]
    code, stdout, err = run_main(
        [*args, "--rater", str(files / "a.tif"), "--rater", str(files / "b.tif")],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    res = json.loads((out / "inter_rater.json").read_text())
    a, b = read_stack(files / "a.tif") > 0, read_stack(files / "b.tif") > 0
    assert res["n_raters"] == 2 and "auroc" not in res
    assert res["mean_pairwise_dice"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    np.testing.assert_allclose(read_stack(out / "disagreement.tif"), 0.5 * (a ^ b))
    np.testing.assert_array_equal(read_stack(out / "consensus.tif"), a & b)  # ties: background
    assert "2 raters: Fleiss' kappa" in stdout


def _error_cases(files: Path) -> list[tuple[list[str], str]]:
    stack, a, b = (str(files / n) for n in ("stack.tif", "a.tif", "b.tif"))
    ir = ["inter-rater", "--stack", stack, "--rater", a]
    return [
        (["uncertainty", str(files / "nan.tif")], "nan.tif: plane 2 holds 1 NaN/inf"),
        (["uncertainty", stack, "--planes", "3:9"], "stack.tif: --planes 3:9 is outside"),
        (["uncertainty", str(files / "flat.tif")], "flat.tif: stack: expected a 3D image"),
        (["uncertainty", str(files / "missing.tif")], "missing.tif: expected a stack"),
        ([*ir, "--rater", str(files / "small.tif")], "small.tif: rater mask has shape"),
        ([*ir, "--rater", str(files / "labels.tif")], "labels.tif: rater mask must be binary"),
        (ir, "at least 2 --rater masks (got only " + a),
        (["inter-rater", "--stack", str(files / "nan.tif"), "--rater", a, "--rater", b], "nan.tif"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_user_mistakes_exit_2_with_one_error_line(
    case: int, files: Path, workdir: Path, monkeypatch, capsys
) -> None:
    argv, said = _error_cases(files)[case]
    code, _, err = run_main([*argv, "--weights", str(files / "punet.pt")], monkeypatch, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and said in errors[0], err
    assert "Traceback" not in err
    assert not (workdir / "reports").exists()  # nothing half-written
