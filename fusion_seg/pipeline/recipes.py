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
    root = "../../shared/data/camvid"

    [[stage]]
    kind = "extract"
    dataset = "camvid"
    root = "${root}"
    split = "train"
    out = "../cache/camvid-train.zarr"

Relative paths (the values of ``root``, ``out``, ``cache``, ``val_cache``, ``init``,
``checkpoint``, ``input``, ``weights`` and the ``sbd`` dataset option) are relative to the
folder of the recipe file, so a recipe means the same from any working directory; a path
that starts with a variable given with ``--set`` is relative to the current directory, like
any other path on a command line. URLs (``s3://...``) are left as they are.

Before the first stage runs (and with ``--dry-run``) the whole recipe is checked against
the functions its stages call (see :func:`fusion_seg.pipeline.stage_checks.check_stage`): kinds, keys,
required keys, value types, dataset and decoder names and options, decoders built from the
feature shapes they will get, and the files each stage reads (made by an earlier stage, or
on disk). Every problem is reported, one line each, in one :class:`UserError`.

A stage whose outputs exist with the same settings is skipped: extraction resumes
(a complete store is a no-op), and train/evaluate/predict leave a stamp of their
settings in their output folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Callable

from fusion_seg.errors import UserError, write_error
from fusion_seg.files import write_json_atomic
from fusion_seg.pipeline.inputs import stage_inputs
from fusion_seg.pipeline.schema import DATASET_PATH_OPTIONS, KINDS, PATH_KEYS

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_LEADING_VAR = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
TOP_LEVEL_KEYS = ("name", "vars", "stage")


def load_recipe(path: str | Path, overrides: dict[str, str] | None = None, *, validate: bool = True,
                cwd: str | Path | None = None) -> dict:
    """Parse a recipe and resolve its ``${vars}`` and relative paths; with ``validate``, check it whole.

    ``cwd`` (default: the current directory) is what relative ``--set`` paths are relative to.
    """
    path = Path(path)
    try:
        recipe = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"recipe not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; pass a recipe file (.toml).") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML: {exc}") from exc
    problems = [f"unknown top-level key {k!r}; a recipe has {', '.join(TOP_LEVEL_KEYS)} ([[stage]] tables)."
                for k in recipe if k not in TOP_LEVEL_KEYS]
    variables = recipe.get("vars", {})
    if not isinstance(variables, dict):
        raise UserError(f"{path}: vars must be a table ([vars]), got {type(variables).__name__}.")
    variables = dict(variables)
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
    if not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
        raise UserError(f"{path}: stages must be [[stage]] tables.")
    base = path.resolve().parent
    here = Path(cwd).resolve() if cwd is not None else Path.cwd()
    values, broken, var_problems = _resolve_vars(variables)
    problems += var_problems
    from_set = _relative_to_cwd(variables, set(overrides or {}))
    resolved, unresolved = [], []
    for i, stage in enumerate(stages, 1):
        used = {m for v in _strings(stage) for m in _VAR.findall(v)}
        missing = sorted(used - set(variables))
        problems += [f"stage {i}: ${{{m}}} is used but not defined in [vars]; add {m} = ... there." for m in missing]
        if missing or used & broken:  # its values are not known: reported above, and not checked further
            resolved.append(dict(stage))
            unresolved.append(i)
            continue
        malformed = sorted({v for v in _strings(_substitute(stage, values)) if "${" in v})
        problems += [f"stage {i}: {v!r} holds '${{' that is no variable reference; write ${{name}} (a name of "
                     "letters, digits and _, no spaces), or remove the '$'." for v in malformed]
        resolved.append(_resolve_paths(stage, _substitute(stage, values), base, here, from_set))
    recipe = {"name": recipe.get("name", path.stem), "vars": variables, "stages": resolved, "path": str(path),
              "problems": problems, "raw": stages,
              "unresolved": unresolved}
    if validate:
        validate_recipe(recipe)
    return recipe


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


def _substitute(value: Any, variables: dict[str, Any]) -> Any:
    if isinstance(value, str):
        whole = _VAR.fullmatch(value)
        if whole:
            return variables[whole.group(1)]
        return _VAR.sub(lambda m: str(variables[m.group(1)]), value)
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    return value


def _resolve_vars(variables: dict[str, Any]) -> tuple[dict[str, Any], set[str], list[str]]:
    """``(values, broken, problems)``: each variable's value with the ``${name}`` it uses replaced by that
    variable's value, transitively. A variable that refers back to itself, directly (``a = "${a}"``) or
    through others (``a = "${b}"``, ``b = "${a}"``), or that uses an undefined one, is ``broken``, and each
    such problem is one line (a cycle once, however many variables are on it)."""
    values: dict[str, Any] = {}
    broken: set[str] = set()
    problems: dict[str, None] = {}  # ordered, each once

    def resolve(name: str, chain: list[str]) -> bool:
        if name in values:
            return True
        if name in broken:
            return False
        if name in chain:
            cycle = chain[chain.index(name):]
            start = min(range(len(cycle)), key=lambda k: cycle[k])  # the same text whichever member is met first
            loop = cycle[start:] + cycle[:start]
            shown = " -> ".join(f"${{{n}}}" for n in loop + loop[:1])
            problems[f"[vars] {shown} refers back to itself, so it has no value; give "
                     f"{'it' if len(loop) == 1 else 'one of them'} a value that does not use "
                     f"{'itself' if len(loop) == 1 else 'the others'}."] = None
            broken.update(loop)
            return False
        ok = True
        for used in sorted({m for v in _strings(variables[name]) for m in _VAR.findall(v)}):
            if used not in variables:
                problems[f"[vars] {name} uses ${{{used}}}, which is not defined; add {used} = ... to [vars]."] = None
                ok = False
            elif not resolve(used, chain + [name]):
                ok = False
        if not ok or name in broken:
            broken.add(name)
            return False
        values[name] = _substitute(variables[name], values)
        return True

    for name in variables:
        resolve(name, [])
    return values, broken, list(problems)


def _relative_to_cwd(variables: dict[str, Any], from_set: set[str]) -> set[str]:
    """The variables whose paths are relative to the current directory: those given with ``--set``, and
    those whose value starts with one of them (``out = "${root}/runs"`` with ``--set root=...``)."""
    found = set(from_set)
    changed = True
    while changed:
        changed = False
        for name, value in variables.items():
            start = _LEADING_VAR.match(value) if isinstance(value, str) and name not in found else None
            if start and start.group(1) in found:
                found.add(name)
                changed = True
    return found


def resolve_path(value: str, raw: Any, base: Path, cwd: Path, from_set: set[str]) -> str:
    """``value`` as an absolute path: relative to ``base`` (the recipe's folder), or to ``cwd`` when the
    recipe's text ``raw`` starts with a variable given with ``--set``. URLs are returned as they are."""
    if "://" in value or not value:
        return value
    start = _LEADING_VAR.match(raw) if isinstance(raw, str) else None
    folder = cwd if start and start.group(1) in from_set else base
    return os.path.normpath(os.path.join(folder, os.path.expanduser(value)))


def _resolve_paths(raw: dict, stage: dict, base: Path, cwd: Path, from_set: set[str]) -> dict:
    for key in PATH_KEYS:
        if isinstance(stage.get(key), str):
            stage[key] = resolve_path(stage[key], raw.get(key), base, cwd, from_set)
    options, raw_options = stage.get("dataset_options"), raw.get("dataset_options")
    if isinstance(options, dict) and isinstance(raw_options, dict):
        for key in DATASET_PATH_OPTIONS:
            if isinstance(options.get(key), str):
                options[key] = resolve_path(options[key], raw_options.get(key), base, cwd, from_set)
    return stage


# --------------------------------------------------------------------------- checking a recipe whole
def validate_recipe(recipe: dict) -> None:
    """Raise one UserError listing every problem of the recipe (one line each); return when there is none."""
    errors = recipe.get("problems", []) + check_recipe(recipe)
    if not errors:
        return
    path = recipe.get("path", recipe["name"])
    lines = [f"{path}: {e}" for e in errors]
    if len(lines) == 1:
        raise UserError(lines[0])
    raise UserError(f"{path} has {len(lines)} problems (no stage was run):\n" + "\n".join(lines))


def _is_url(value: str) -> bool:
    return "://" in value and not value.startswith("file://")


def _local(value: str) -> Path:
    return Path(value.split("://", 1)[1] if value.startswith("file://") else value)


def check_recipe(recipe: dict) -> list[str]:
    """Every problem of a loaded recipe's stages, as ``stage N (kind): ...`` lines; [] when none. The same
    problem in several stages (a missing dataset root, say) is one line naming them all."""
    from fusion_seg.pipeline.stage_checks import check_stage

    check = _RecipeCheck(recipe)
    errors: list[str] = []
    found: dict[str, list[tuple[int, str]]] = {}  # problem -> the stages that have it
    for i, stage in enumerate(check.stages, 1):
        kind = stage.get("kind")
        if i in recipe.get("unresolved", ()):
            continue  # its undefined ${vars} are reported; its values are not known
        if kind not in KINDS:
            errors.append(f"stage {i} has no kind; add kind = one of {', '.join(repr(k) for k in KINDS)}."
                          if kind is None else
                          f"stage {i} has kind {kind!r}; expected one of {', '.join(repr(k) for k in KINDS)}.")
            continue
        problems: list[str] = []
        shapes, classes = check.references(i, stage, problems)
        problems += check.files(i, stage)
        problems += check_stage(stage, shapes=shapes, num_classes=classes)
        for p in problems:
            found.setdefault(p, []).append((i, kind))
    for problem, where in found.items():
        if len(where) == 1:
            errors.append(f"stage {where[0][0]} ({where[0][1]}): {problem}")
        else:
            names = ", ".join(f"{i} ({kind})" for i, kind in where)
            errors.append(f"stages {names}: {problem}")
    return errors


class _RecipeCheck:
    """What :func:`check_recipe` knows of a whole recipe: what each stage makes (stores: an extract stage's
    ``out``; checkpoints: a train stage's ``out/best.pt`` and ``out/last.pt``), so that a stage's inputs can be
    told made by an earlier stage, present on disk, or missing; and the raw stages, to name a ``${var}``."""

    def __init__(self, recipe: dict):
        self.stages, self.raw = recipe["stages"], recipe.get("raw") or recipe["stages"]
        self.stores, self.checkpoints = {}, {}
        for i, stage in enumerate(self.stages, 1):
            out = stage.get("out")
            if not isinstance(out, str):
                continue
            if stage.get("kind") == "extract":
                self.stores.setdefault(out, i)
            elif stage.get("kind") == "train":
                for name in ("best.pt", "last.pt"):
                    self.checkpoints.setdefault(os.path.join(out, name), i)

    def var_hint(self, i: int, key: str) -> str:
        raw = self.raw[i - 1].get(key)
        m = _LEADING_VAR.match(raw) if isinstance(raw, str) else None
        return f" (from ${{{m.group(1)}}}: fix it in [vars] or with --set {m.group(1)}=...)" if m else ""

    def reference(self, i: int, key: str, made: dict, what: str, maker: str, problems: list[str]) -> bool:
        """True when stage ``i``'s ``key`` is made by an earlier stage; when it is neither made earlier nor on
        disk, adds to ``problems`` what to do."""
        value = self.stages[i - 1].get(key)
        if not isinstance(value, str) or _is_url(value):
            return False
        j = made.get(value)
        if j is not None and j < i:
            return True
        exists = (_local(value) / "zarr.json").is_file() if what == "store" else _local(value).exists()
        if exists:
            return False
        if j is not None:
            problems.append(f"{key} {value} is made by stage {j}, which runs after this one; "
                            f"move stage {j} before stage {i}.")
        else:
            problems.append(f"{key} {value} does not exist and no earlier stage makes it{self.var_hint(i, key)}; "
                            f"fix the path, or add {maker} before this stage.")
        return False

    def references(self, i: int, stage: dict, problems: list[str]) -> tuple[dict | None, int]:
        """Check the stores and checkpoints stage ``i`` reads (adding to ``problems``); and, for a train stage
        from a cache, the feature shapes and class count its decoder will be built for (None, 2: not known)."""
        kind, shapes, classes = stage["kind"], None, 2
        if kind == "train" and stage.get("online") is not True:
            shapes, classes = self.cache_shapes(i, stage, problems)
        if kind == "train":
            self.reference(i, "val_cache", self.stores, "store", "an extract stage with this out", problems)
            self.reference(i, "init", self.checkpoints, "checkpoint", "a train stage that writes it", problems)
        if kind in ("evaluate", "predict"):
            self.reference(i, "checkpoint", self.checkpoints, "checkpoint", "a train stage that writes it", problems)
        return shapes, classes

    def cache_shapes(self, i: int, stage: dict, problems: list[str]) -> tuple[dict | None, int]:
        """The shapes of the store a train stage reads: the extract stage's that makes it, or the store's on disk."""
        from fusion_seg.pipeline.schema import stage_schema
        from fusion_seg.pipeline.stage_checks import encoder_shapes

        if self.reference(i, "cache", self.stores, "store", "an extract stage with this out", problems):
            maker = self.stages[self.stores[stage["cache"]] - 1]
            schema = stage_schema("extract")
            try:
                return encoder_shapes(maker.get("encoder", schema["encoder"].default),
                                      maker.get("strides", schema["strides"].default)), 2
            except (UserError, TypeError):
                return None, 2  # reported with the extract stage
        cache = stage.get("cache")
        if isinstance(cache, str) and not _is_url(cache) and (_local(cache) / "zarr.json").is_file():
            from fusion_seg.cache.store import FeatureStore

            try:
                spec = FeatureStore.open(cache).spec
                return spec.input_shapes(), max(1, len(spec.classes))
            except UserError as exc:
                problems.append(f"cache: {exc}")
        return None, 2

    def files(self, i: int, stage: dict) -> list[str]:
        """The files and folders stage ``i`` names that must exist before it runs: predict's input (and where its
        results go), weights, and the root of a dataset read from files."""
        from fusion_seg.data.datasets import DATASETS, FileSegDataset, SegDataset

        kind, problems = stage["kind"], []
        if kind == "predict" and isinstance(stage.get("input"), str):
            if not Path(stage["input"]).exists():
                problems.append(f"input {stage['input']} does not exist{self.var_hint(i, 'input')}; "
                                "pass an image file or a folder of images.")
            elif isinstance(stage.get("out"), str):
                problems += _prediction_problems(stage["input"], stage["out"])
        if isinstance(stage.get("weights"), str) and not Path(stage["weights"]).is_file():
            problems.append(f"weights {stage['weights']} is not a file{self.var_hint(i, 'weights')}.")
        dataset = stage.get("dataset")
        reads_images = kind in ("extract", "evaluate") or (kind == "train" and stage.get("online") is True)
        if reads_images and isinstance(dataset, str) and issubclass(DATASETS.get(dataset, SegDataset), FileSegDataset):
            root = stage.get("root")
            if root is None:
                problems.append(f"dataset {dataset!r} needs root = FOLDER (its files).")
            elif isinstance(root, str) and not Path(root).is_dir():
                problems.append(f"root {root} ({dataset}) does not exist{self.var_hint(i, 'root')}.")
        return problems


def _prediction_problems(inputs: str, out: str) -> list[str]:
    """What predict refuses about where its results go (:func:`~fusion_seg.inference.predict.prediction_targets`):
    ``out`` the input folder, or a result over an input image or another result. An input folder without
    images yet is left for predict to report when it runs."""
    from fusion_seg.inference.predict import list_images, prediction_targets

    try:
        list_images(inputs)
    except UserError:
        return []
    try:
        prediction_targets(inputs, Path(out))
    except UserError as exc:
        return [str(exc)]
    return []


def stage_title(stage: dict) -> str:
    target = stage.get("out") or stage.get("checkpoint") or ""
    return f"{stage['kind']} -> {target}"


def _stamp_path(stage: dict) -> Path | None:
    if stage["kind"] == "extract":
        return None  # the store's own completion record decides
    if stage["kind"] == "evaluate":
        return Path(stage["out"]) / ".stage.json" if stage.get("out") else None
    return Path(stage["out"]) / f".stage-{stage['kind']}.json"


def _stamp(stage: dict) -> dict:
    """What a stage's stamp records to tell whether it is up to date: its settings (a hash of the stage)
    and the identity of each input it reads (inputs.py: store content, checkpoint hash, file listings)."""
    return {"settings": hashlib.sha256(json.dumps(stage, sort_keys=True).encode()).hexdigest(),
            "inputs": stage_inputs(stage)}


def _read_stamp(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # unreadable: the stage runs again
    return stamp if isinstance(stamp, dict) else None


def _changes(old: dict, new: dict, stage: dict) -> str | None:
    """None when a stage is up to date (its stamp ``old`` has ``new``'s settings and inputs); else what changed."""
    if "inputs" not in old:
        return "its stamp is from an earlier fusion-seg, which did not record its inputs"
    what = []
    if old.get("settings") != new["settings"]:
        before = old.get("stage") or {}
        keys = sorted(k for k in set(before) | set(stage) if before.get(k) != stage.get(k))
        what.append(f"settings ({', '.join(keys) or 'changed'})")
    inputs = sorted(k for k in set(old["inputs"]) | set(new["inputs"]) if old["inputs"].get(k) != new["inputs"].get(k))
    what += [f"{k} {stage.get(k, '')}".rstrip() for k in inputs]
    return ", ".join(what) + " changed since its last run" if what else None


def run_recipe(path: str | Path, *, overrides: dict[str, str] | None = None, dry_run: bool = False,
               epoch_scale: float = 1.0, echo: Callable[[str], None] = print, progress: bool = True) -> list[dict]:
    """Check a recipe whole, then run its stages; returns one summary per stage.

    A stage is skipped only when its stamp shows the same settings and the same inputs (see
    :func:`_stamp`); otherwise it runs, and the line before it says what changed. A train stage
    continues the run in its ``out`` only when that run has these settings and this data; else that
    run is kept as ``OUT.previous-N`` and a new one trains (``resume="auto"``, run_dir.py).

    ``epoch_scale`` multiplies every train stage's epochs (at least 1), to run a paper-length
    schedule shorter. ``dry_run`` checks and prints the resolved stages, and runs nothing.
    """
    if epoch_scale <= 0:
        raise UserError("--epoch-scale must be positive.")
    recipe = load_recipe(path, overrides, validate=False)
    for stage in recipe["stages"]:
        epochs = stage.get("epochs")
        if stage.get("kind") == "train" and isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1:
            stage["epochs"] = max(1, round(epochs * epoch_scale))
    validate_recipe(recipe)  # every stage, before the first one runs

    from fusion_seg.pipeline.stages import run_stage

    results = []
    for i, stage in enumerate(recipe["stages"], 1):
        title = f"[{i}/{len(recipe['stages'])}] {stage_title(stage)}"
        if dry_run:
            echo(f"{title}\n" + "\n".join(f"    {k} = {json.dumps(v)}" for k, v in stage.items() if k != "kind"))
            results.append({"stage": stage, "status": "dry-run"})
            continue
        stamp_path = _stamp_path(stage)
        stamp = _stamp(stage) if stamp_path else None
        if stamp_path:
            old = _read_stamp(stamp_path)
            changed = _changes(old, stamp, stage) if old is not None else None
            if old is not None and changed is None:
                echo(f"{title}: up to date (same settings and inputs), skipped")
                results.append({"stage": stage, "status": "skipped"})
                continue
            echo(f"{title}: {changed}" if changed else title)
        else:
            echo(title)
        summary = run_stage(stage, progress=progress)
        if stamp_path:
            try:
                write_json_atomic(stamp_path, {**stamp, "stage": stage, "summary": summary})
            except OSError as exc:
                raise write_error(stamp_path, exc, what="the stage's stamp", option=f"stage {i} out",
                                  then="The stage itself finished; a re-run repeats it.") from None
        echo(f"{title}: done {json.dumps(summary)}")
        results.append({"stage": stage, "status": "ran", "summary": summary})
    return results
