"""Training profiles: the CPU demo that ``make demo`` runs and the full budget of GPU runners.

``params.yaml`` *is* the demo profile. A profile file ``profiles/<name>.yaml`` lists the
params it owns as dotted paths with complete values::

    profile: full
    set:
      cells.models: {...}          # every model the profile trains, with its budget
      yolo.train.epochs: 60

``microseg profile full`` replaces exactly those paths in ``params.yaml`` (comments and the
rest of the file kept, written atomically), so ``dvc repro`` then retrains what changed.
Every profile sets the same paths (checked), which makes switching symmetric:
``microseg profile demo`` restores the committed demo. The top-level ``profile`` key names the
profile a ``params.yaml`` holds; stages copy it into their metrics and reports.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.utils.atomic import write_text

PROFILES_DIR = Path("profiles")


def _yaml():
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.width = 100
    return y


def read_profile(name: str, root: Path = PROFILES_DIR) -> dict[str, Any]:
    """``{"profile": name, "set": {dotted path: value}}`` of ``profiles/<name>.yaml``."""
    path = root / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in root.glob("*.yaml")) if root.is_dir() else []
        raise MissingFileError(f"no profile {name!r}; known profiles: {known}", path)
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DataFormatError(f"not valid YAML ({exc})", path) from exc
    if not isinstance(data, dict) or not isinstance(data.get("set"), dict):
        raise DataFormatError("expected a mapping with a 'set' mapping of dotted paths", path)
    if data.get("profile") != name:
        raise DataFormatError(f"expected 'profile: {name}', found {data.get('profile')!r}", path)
    return data


def profile_paths(root: Path = PROFILES_DIR) -> dict[str, set[str]]:
    """The dotted paths each profile sets (every profile must set the same ones)."""
    return {p.stem: set(read_profile(p.stem, root)["set"]) for p in sorted(root.glob("*.yaml"))}


def check_profiles(root: Path = PROFILES_DIR) -> None:
    """Refuse profiles that set different paths: switching back would leave stale values."""
    paths = profile_paths(root)
    names = sorted(paths)
    for a in names:
        for b in names:
            extra = paths[a] - paths[b]
            if extra:
                raise ConfigError(
                    f"profile {a!r} sets {sorted(extra)} that profile {b!r} does not; every "
                    f"profile in {root} must set the same paths"
                )


def _set_path(doc: Any, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = doc
    for k in keys[:-1]:
        if not isinstance(node, Mapping) or k not in node:
            raise ConfigError(f"profile path {dotted!r}: {k!r} is not in params.yaml")
        node = node[k]
    if not isinstance(node, Mapping):
        raise ConfigError(f"profile path {dotted!r}: its parent is not a mapping")
    node[keys[-1]] = value


def get_path(doc: Mapping[str, Any], dotted: str) -> Any:
    node: Any = doc
    for k in dotted.split("."):
        if not isinstance(node, Mapping) or k not in node:
            raise ConfigError(f"profile path {dotted!r} is not in params.yaml")
        node = node[k]
    return node


def apply_profile(
    name: str, params_path: Path = Path("params.yaml"), root: Path = PROFILES_DIR
) -> list[str]:
    """Rewrite ``params_path`` with profile ``name``'s values; the paths that changed."""
    check_profiles(root)
    profile = read_profile(name, root)
    if not params_path.is_file():
        raise MissingFileError("params file not found", params_path)
    y = _yaml()
    doc = y.load(params_path.read_text())
    import yaml

    plain = yaml.safe_load(params_path.read_text())
    changed = [p for p, v in profile["set"].items() if _plain(get_path(plain, p)) != _plain(v)]
    for dotted, value in profile["set"].items():
        _set_path(doc, dotted, value)
    doc["profile"] = name
    if plain.get("profile") != name:
        changed.append("profile")
    buf = io.StringIO()
    y.dump(doc, buf)
    # validate before writing: a profile must produce a params file the stages accept
    from microseg.config import Params

    Params.model_validate(yaml.safe_load(buf.getvalue()))
    write_text(params_path, buf.getvalue())
    return changed


def _plain(value: Any) -> Any:
    """Comparable plain Python (ruamel/YAML containers and tuples normalised)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
