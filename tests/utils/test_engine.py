"""run_inputs on the local engine: one worker built once, inputs in order, finished ones
skipped; options checked. The Ray engine runs for real in tests/registry/test_batch_eval_ray.py."""

from __future__ import annotations

import sys

import pytest

from microseg.errors import ConfigError, MicrosegError, MissingExtraError
from microseg.utils.engine import EngineOptions, run_inputs


def test_local_builds_one_worker_and_keeps_order() -> None:
    built: list[int] = []

    def make_worker():
        built.append(1)
        return lambda x: x * 10

    seen: list[tuple[int, bool]] = []
    out = run_inputs(
        [3, 1, 2, 5],
        make_worker,
        done=lambda x: x == 2,
        progress=False,
        on_result=lambda x, o: seen.append((x, o.skipped)),
    )
    assert built == [1]
    assert [(o.index, o.skipped, o.value) for o in out] == [
        (0, False, 30),
        (1, False, 10),
        (2, True, None),
        (3, False, 50),
    ]
    assert seen == [(2, True), (3, False), (1, False), (5, False)]  # skips are known first


def test_nothing_to_do_builds_no_worker() -> None:
    def make_worker():
        raise AssertionError("built for nothing")

    out = run_inputs(["a"], make_worker, done=lambda _: True, progress=False)
    assert [o.skipped for o in out] == [True]


def test_an_error_of_the_function_ends_the_run_as_before() -> None:
    def make_worker():
        def f(x: int) -> int:
            if x == 2:
                raise ValueError("bad input 2")
            return x

        return f

    with pytest.raises(ValueError, match="bad input 2"):
        run_inputs([1, 2, 3], make_worker, progress=False)


def test_options_are_checked_and_params_override() -> None:
    with pytest.raises(ConfigError, match="--engine expects one of"):
        EngineOptions(engine="dask")
    with pytest.raises(ConfigError, match="num_workers >= 1"):
        EngineOptions(num_workers=0)
    opts = EngineOptions.from_mapping(
        {"engine": "local", "address": None, "num_workers": 4, "unknown": 1},
        engine="ray",
        address=None,
    )
    assert (opts.engine, opts.address, opts.num_workers) == ("ray", None, 4)


def test_ray_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"microseg\[scale\]"):
        run_inputs([1], lambda: lambda x: x, EngineOptions(engine="ray"), progress=False)


def _dies_on(poison: str, tally: str):
    """A worker factory whose worker kills its own process on ``poison`` (each death is a file
    in ``tally``): what an out-of-memory kill of one huge stack looks like to the driver."""

    def make():
        import os
        import uuid
        from pathlib import Path

        def work(item: str) -> str:
            if item == poison:
                (Path(tally) / uuid.uuid4().hex).touch()
                os._exit(1)
            return item.upper()

        return work

    return make


@pytest.mark.slow
def test_ray_input_that_kills_every_worker_ends_the_run_named(tmp_path) -> None:
    pytest.importorskip("ray")
    done: list[str] = []
    opts = EngineOptions(engine="ray", num_workers=2, max_retries=1)
    with pytest.raises(MicrosegError, match="Ray workers died on this input") as err:
        run_inputs(
            ["a", "b", "bad", "c"],
            _dies_on("bad", str(tmp_path)),
            opts,
            on_result=lambda item, outcome: done.append(outcome.value),
            progress=False,
        )
    assert "bad" in str(err.value)
    # restarts of its worker, then a fresh worker and its restarts: every one died on it
    assert len(list(tmp_path.iterdir())) == (opts.max_retries + 1) ** 2
    assert "BAD" not in done
