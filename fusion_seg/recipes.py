"""Recipes: a TOML file listing stages (extract, train, evaluate, predict) run in order.

A recipe is data, never code. Its only indirection is ``${name}``, replaced by the
value of ``name`` in its ``[vars]`` table, which ``--set name=value`` overrides (e.g.
a dataset root). A string that is exactly ``"${name}"`` takes the variable's value
with its type (a number, a boolean); inside a longer string the value is inserted
as text. ``--set`` values are read as JSON when they parse (``8``, ``true``), else
as text. Each stage's keys are the keyword arguments of the library function it
calls, so a recipe reads like the equivalent command lines::

    name = "demo"
    [vars]
    root = "../shared/data/camvid"

    [[stage]]
    kind = "extract"
    dataset = "camvid"
    root = "${root}"
    split = "train"
    out = "cache/camvid-train.zarr"

A stage whose outputs exist with the same settings is skipped: extraction resumes
(a complete store is a no-op), and train/evaluate/predict leave a stamp of their
settings in their output folder.
"""
from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Callable

from .errors import UserError

KINDS = ("extract", "train", "evaluate", "predict")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def load_recipe(path: str | Path, overrides: dict[str, str] | None = None) -> dict:
    """Parse and validate a recipe, with ``${vars}`` resolved."""
    path = Path(path)
    try:
        recipe = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"recipe not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML: {exc}") from exc
    variables = dict(recipe.get("vars", {}))
    for key, value in (overrides or {}).items():
        if key not in variables:
            raise UserError(f"--set {key}: the recipe {path} has no variable {key!r} (it has {sorted(variables)}).")
        try:
            variables[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            variables[key] = value
    stages = recipe.get("stage", [])
    if not stages:
        raise UserError(f"{path} has no [[stage]] tables; nothing to run.")
    resolved = []
    for i, stage in enumerate(stages):
        kind = stage.get("kind")
        if kind not in KINDS:
            raise UserError(f"{path}: stage {i + 1} has kind {kind!r}; expected one of {', '.join(KINDS)}.")
        resolved.append(_substitute(stage, variables, path))
    return {"name": recipe.get("name", path.stem), "vars": variables, "stages": resolved}


def _substitute(value: Any, variables: dict[str, Any], path: Path) -> Any:
    if isinstance(value, str):
        def lookup(name):
            if name not in variables:
                raise UserError(f"{path}: ${{{name}}} is used but not defined in [vars].")
            return variables[name]
        whole = _VAR.fullmatch(value)
        if whole:
            return lookup(whole.group(1))
        return _VAR.sub(lambda m: str(lookup(m.group(1))), value)
    if isinstance(value, list):
        return [_substitute(v, variables, path) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables, path) for k, v in value.items()}
    return value


def stage_title(stage: dict) -> str:
    target = stage.get("out") or stage.get("checkpoint") or ""
    return f"{stage['kind']} -> {target}"


def _stamp_path(stage: dict) -> Path | None:
    if stage["kind"] == "extract":
        return None  # the store's own completion record decides
    if stage["kind"] == "evaluate":
        return Path(stage["out"]) / ".stage.json" if stage.get("out") else None
    return Path(stage["out"]) / f".stage-{stage['kind']}.json"


def _fingerprint(stage: dict) -> str:
    """Settings plus the content of the checkpoint a stage reads (so retraining invalidates it)."""
    h = hashlib.sha256(json.dumps(stage, sort_keys=True).encode())
    ckpt = stage.get("checkpoint")
    if ckpt and Path(ckpt).is_file():
        h.update(hashlib.sha256(Path(ckpt).read_bytes()).digest())
    return h.hexdigest()


def run_recipe(path: str | Path, *, overrides: dict[str, str] | None = None, dry_run: bool = False,
               epoch_scale: float = 1.0, echo: Callable[[str], None] = print, progress: bool = True) -> list[dict]:
    """Run every stage of a recipe; returns one summary per stage.

    ``epoch_scale`` multiplies every train stage's epochs (at least 1), to run a paper-length
    schedule shorter.
    """
    from .stages import run_stage  # heavy imports only when actually running

    recipe = load_recipe(path, overrides)
    if epoch_scale <= 0:
        raise UserError("--epoch-scale must be positive.")
    for stage in recipe["stages"]:
        if stage["kind"] == "train" and "epochs" in stage:
            stage["epochs"] = max(1, round(stage["epochs"] * epoch_scale))
    results = []
    for i, stage in enumerate(recipe["stages"], 1):
        title = f"[{i}/{len(recipe['stages'])}] {stage_title(stage)}"
        if dry_run:
            echo(f"{title}\n" + "\n".join(f"    {k} = {json.dumps(v)}" for k, v in stage.items() if k != "kind"))
            results.append({"stage": stage, "status": "dry-run"})
            continue
        stamp = _stamp_path(stage)
        fingerprint = _fingerprint(stage)
        if stamp and stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
            echo(f"{title}: up to date, skipped")
            results.append({"stage": stage, "status": "skipped"})
            continue
        echo(title)
        summary = run_stage(stage, progress=progress)
        if stamp:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(json.dumps({"fingerprint": fingerprint, "stage": stage, "summary": summary}, indent=2))
        echo(f"{title}: done {json.dumps(summary)}")
        results.append({"stage": stage, "status": "ran", "summary": summary})
    return results
