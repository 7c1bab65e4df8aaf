"""``microseg profile``: switch ``params.yaml`` between the demo and the full training budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from microseg.cli._options import ParamsOpt


def profile(
    name: Annotated[
        str | None, typer.Argument(help="profile to apply (profiles/<name>.yaml); none: show")
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Apply a training profile to params.yaml (`demo`: the CPU demo; `full`: GPU budgets)."""
    import yaml

    from microseg.stages.profile import PROFILES_DIR, apply_profile, profile_paths

    if name is None:
        current = (yaml.safe_load(params_path.read_text()) or {}).get("profile", "demo")
        typer.echo(f"profile: {current} (known: {', '.join(sorted(profile_paths()))})")
        return
    changed = apply_profile(name, params_path, PROFILES_DIR)
    if not changed:
        typer.echo(f"{params_path} already holds profile {name!r}")
        return
    typer.echo(f"{params_path}: profile {name!r} set {len(changed)} value(s): {', '.join(changed)}")
    typer.echo("run `dvc repro` to retrain what changed (`dvc status` lists it)")
