"""Profile overrides from the command line: ``./run_all.sh --configs SPEC[,SPEC...]`` and
``--profile-file FILE`` (TOML, JSON or YAML), so a plug-in reducer reaches every table without an
edit to this repository.

``--configs`` adds reducer specs to every table of the profile: the accuracy table (off-the-shelf and
fine-tuned rows), the FLOPs table and the throughput table (the profile's speed configuration lists,
per model too), and the segmentation table (``seg_configs``: rows next to the keep-rate rows).  Specs are separated by commas; an item ``key=value`` continues
the spec before it, so ``--configs droptail:n=20,at=3,tome:r=8`` is ``droptail:n=20,at=3`` and
``tome:r=8``.  The flag may be repeated.

A profile file holds plain data (every key optional)::

    # my_profile.toml
    configs = ["droptail:n=20,at=3"]          # as --configs: added to every table
    finetune_max_steps = 10                   # any other profile key: replaces the profile's value
    cost_models = ["deit_small_patch16_224"]

    [add]                                     # appended to the profile's list (duplicates skipped)
    accuracy_configs = ["droptail:n=40,at=2"]

    [speed]                                   # merged key by key into the profile's speed settings
    batch_size = 4

Every key, type and reducer spec is checked before anything runs; a mistake is one line naming the
key and what is allowed (exit code 2).  The overrides are recorded in every table's metadata
(``profile_overrides``, and the ``command`` line) and in ``manifest.json``.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from bench.core.errors import ConfigError

# Profile keys whose values are lists of reducer specs.
SPEC_LIST_KEYS = ("accuracy_configs", "finetune_configs", "cost_configs")

# key -> (kind, description); kinds: specs, models, pos_int, int>=0, pos_num, fraction list, ablations, ...
TOP_KEYS: dict[str, tuple[str, str]] = {
    "accuracy_configs": ("specs", "reducer specs of the accuracy table"),
    "finetune_configs": ("specs", "reducer specs fine-tuned for the accuracy table"),
    "cost_configs": ("specs", "reducer specs of the FLOPs table (and of the throughput table without speed.configs)"),
    "cost_models": ("models", "timm model names of the FLOPs table"),
    "accuracy_models": ("models", "paper profile: timm model names evaluated on ImageNet"),
    "finetune_epochs": ("pos_int", "epochs of each fine-tuned row"),
    "finetune_max_steps": ("pos_int", "step budget of each fine-tuned row (proxy)"),
    "ablation_epochs": ("pos_int", "epochs of each ablation row"),
    "ablation_max_steps": ("pos_int", "step budget of each ablation row"),
    "seg_keeps": ("fractions", "segmentation keep rates"),
    "seg_configs": ("specs", "reducer specs added to the segmentation table (next to its keep-rate rows)"),
    "ablations": ("ablations", "ablation variants as [label, spec] pairs (any method; calibrated ones are calibrated first)"),
    "speed": ("speed", "throughput settings, merged key by key"),
}
SPEED_KEYS: dict[str, str] = {
    "models": "models", "configs": "specs", "compile_configs": "specs",
    "batch_size": "pos_int", "batch_sizes": "pos_ints", "compile_batch_sizes": "pos_ints",
    "precision": "precision", "also_precisions": "precisions",
    "warmup": "int>=0", "iters": "pos_int", "min_iters": "pos_int", "repeats": "pos_int", "pair_every": "pos_int",
    "extra_repeats": "int>=0", "refill_repeats": "int>=0",
    "min_time": "pos_num", "budget_s": "pos_num",
    "timm_baselines": "timm_baselines", "per_model": "per_model",
}
PRECISIONS = ("fp32", "amp", "bf16")
TIMM_BASELINES = ("compile", "channels_last")
FILE_KEYS = ("configs", "add", *TOP_KEYS)


# --------------------------------------------------------------------------- --configs
def split_configs(text: str) -> list[str]:
    """``'droptail:n=20,at=3,tome:r=8,none'`` -> ``['droptail:n=20,at=3', 'tome:r=8', 'none']``: an
    item ``key=value`` (no ``:`` before its ``=``) continues the spec before it; brackets nest."""
    from bench.core.registry import _split_top

    specs: list[str] = []
    for item in _split_top(text.strip(), text):
        eq, colon = item.find("="), item.find(":")
        continues = eq > 0 and (colon < 0 or colon > eq)
        if continues:
            if not specs:
                raise ConfigError(f"--configs '{text}': '{item}' is an option with no reducer before it; "
                                  "write name:key=value,key=value")
            specs[-1] += ("," if ":" in specs[-1] else ":") + item
        else:
            specs.append(item)
    if not specs:
        raise ConfigError("--configs is empty; give reducer specs, e.g. --configs tome:r=8,droptail:n=20,at=3")
    return specs


# --------------------------------------------------------------------------- profile files
def load_file(path: str) -> dict:
    """A profile file as a dict (``.toml``, ``.json``, ``.yaml``/``.yml``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--profile-file {path}: no such file")
    suffix = p.suffix.lower()
    text = p.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"--profile-file {path}: reading YAML needs PyYAML; use a .toml or .json file") \
                    from None
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"--profile-file {path}: unknown format '{suffix or '(no suffix)'}'; "
                              "use .toml, .json or .yaml")
    except ConfigError:
        raise
    except Exception as e:  # a parse error: its message names the line
        raise ConfigError(f"--profile-file {path}: cannot parse: {' '.join(str(e).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--profile-file {path}: expected a table of profile keys at the top, "
                          f"got {type(data).__name__}")
    return data


def _check_value(where: str, kind: str, v: Any) -> Any:
    """``v`` checked against ``kind``; returns it (specs are validated by building the reducer)."""
    def fail(want: str):
        raise ConfigError(f"{where}: expected {want}, got {json.dumps(v, default=str)}")

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if kind == "specs":
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            fail("a list of reducer specs (strings)")
        for s in v:
            check_spec(s, where)
    elif kind == "models":
        if not isinstance(v, list) or not v or not all(isinstance(s, str) and s.strip() for s in v):
            fail("a non-empty list of timm model names")
    elif kind == "pos_int":
        if not is_int(v) or v < 1:
            fail("a whole number >= 1")
    elif kind == "int>=0":
        if not is_int(v) or v < 0:
            fail("a whole number >= 0")
    elif kind == "pos_ints":
        if not isinstance(v, list) or not v or not all(is_int(x) and x >= 1 for x in v):
            fail("a non-empty list of whole numbers >= 1")
    elif kind == "pos_num":
        if not (is_int(v) or isinstance(v, float)) or not v > 0:
            fail("a number > 0")
    elif kind == "fractions":
        if not isinstance(v, list) or not v or not all(
                (is_int(x) or isinstance(x, float)) and 0 < x <= 1 for x in v):
            fail("a non-empty list of keep rates in (0, 1]")
    elif kind == "precision":
        if v not in PRECISIONS:
            fail(f"one of {', '.join(PRECISIONS)}")
    elif kind == "precisions":
        if not isinstance(v, list) or not all(x in PRECISIONS for x in v):
            fail(f"a list of {', '.join(PRECISIONS)}")
    elif kind == "timm_baselines":
        if not isinstance(v, list) or not all(x in TIMM_BASELINES for x in v):
            fail(f"a list of {', '.join(TIMM_BASELINES)}")
    elif kind == "ablations":
        if not isinstance(v, list) or not all(
                isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(y, str) for y in x) for x in v):
            fail("a list of [label, spec] pairs")
        for _, s in v:
            check_spec(s, where)
        v = [tuple(x) for x in v]
    elif kind == "speed":
        if not isinstance(v, dict):
            fail("a table of speed settings")
        for k, x in v.items():
            _check_speed_key(f"{where}.{k}", k, x)
    elif kind == "per_model":
        if not isinstance(v, dict) or not all(isinstance(x, dict) for x in v.values()):
            fail("a table of model name -> table of speed settings")
        for m, over in v.items():
            for k, x in over.items():
                if k == "per_model":
                    raise ConfigError(f"{where}.{m}: per_model cannot nest")
                _check_speed_key(f"{where}.{m}.{k}", k, x)
    else:  # pragma: no cover - a kind without a check is a bug here
        raise AssertionError(kind)
    return v


def _check_speed_key(where: str, k: str, v: Any) -> None:
    if k not in SPEED_KEYS:
        raise ConfigError(f"{where}: unknown speed setting '{k}'; allowed: {', '.join(SPEED_KEYS)}")
    _check_value(where, SPEED_KEYS[k], v)


def check_spec(spec: str, where: str) -> None:
    """A reducer spec must build (known reducer, known options, valid values), else one line."""
    from bench.core import registry

    try:
        registry.build(spec)
    except ConfigError as e:
        raise ConfigError(f"{where}: spec '{spec}': {e}") from None


# --------------------------------------------------------------------------- applying
def _add(lst: list, specs: list) -> list:
    out = list(lst)
    for s in specs:
        if s not in out:
            out.append(s)
    return out


def add_configs(prof: dict, specs: list[str]) -> None:
    """Add ``specs`` to every classification table's config lists and to the segmentation table (in
    place)."""
    for k in SPEC_LIST_KEYS:
        if k in prof:
            prof[k] = _add(prof[k], specs)
    prof["seg_configs"] = _add(prof.get("seg_configs", []), specs)
    sp = prof.get("speed")
    if isinstance(sp, dict):
        if "configs" in sp:
            sp["configs"] = _add(sp["configs"], specs)
        for over in (sp.get("per_model") or {}).values():
            if "configs" in over:
                over["configs"] = _add(over["configs"], specs)


def apply(prof: dict, configs: Optional[list[str]] = None, profile_file: Optional[str] = None) -> dict:
    """The profile with ``--configs`` (a list of ``--configs`` values) and ``--profile-file`` applied,
    validated; adds ``prof['overrides']`` describing what changed (empty dict: nothing)."""
    prof = copy.deepcopy(prof)
    record: dict = {}
    if profile_file:
        data = load_file(profile_file)
        where = f"--profile-file {profile_file}"
        unknown = [k for k in data if k not in FILE_KEYS]
        if unknown:
            raise ConfigError(f"{where}: unknown key '{unknown[0]}'; allowed: {', '.join(FILE_KEYS)}")
        file_specs = data.get("configs")
        if file_specs is not None:
            _check_value(f"{where}: configs", "specs", file_specs)
        replaced = {}
        for k, v in data.items():
            if k in ("configs", "add"):
                continue
            v = _check_value(f"{where}: {k}", TOP_KEYS[k][0], v)
            if k == "speed":
                merged = dict(prof.get("speed") or {})
                merged.update(copy.deepcopy(v))
                prof["speed"] = merged
            else:
                prof[k] = copy.deepcopy(v)
            replaced[k] = v
        added = {}
        add = data.get("add") or {}
        if not isinstance(add, dict):
            raise ConfigError(f"{where}: [add] must be a table of list keys")
        for k, v in add.items():
            if k not in TOP_KEYS or TOP_KEYS[k][0] not in ("specs", "models", "fractions", "ablations"):
                lists = [n for n, (kind, _) in TOP_KEYS.items() if kind in ("specs", "models", "fractions", "ablations")]
                raise ConfigError(f"{where}: [add] {k}: not a list setting; [add] takes {', '.join(lists)}")
            v = _check_value(f"{where}: add.{k}", TOP_KEYS[k][0], v)
            prof[k] = _add(prof.get(k, []), v)
            added[k] = v
        if file_specs:
            add_configs(prof, file_specs)
        record["profile_file"] = str(profile_file)
        record["profile_file_sha256"] = hashlib.sha256(Path(profile_file).read_bytes()).hexdigest()[:16]
        if file_specs:
            record["file_configs"] = list(file_specs)
        if replaced:
            record["replaced"] = replaced
        if added:
            record["added"] = added
    if configs:
        specs = []
        for text in configs:
            specs += split_configs(text)
        for s in specs:
            check_spec(s, "--configs")
        add_configs(prof, specs)
        record["configs"] = specs
    prof["overrides"] = record
    return prof


def describe(record: dict) -> str:
    """One line for table headers: what the overrides changed."""
    parts = []
    if record.get("configs"):
        parts.append("--configs added " + ", ".join(record["configs"]) + " to every table")
    if record.get("profile_file"):
        bits = []
        if record.get("file_configs"):
            bits.append("added " + ", ".join(record["file_configs"]) + " to every table")
        if record.get("replaced"):
            bits.append("set " + ", ".join(record["replaced"]))
        if record.get("added"):
            bits.append("extended " + ", ".join(record["added"]))
        parts.append(f"--profile-file {record['profile_file']} (sha256 {record['profile_file_sha256']})"
                     + (": " + "; ".join(bits) if bits else ""))
    return "; ".join(parts)
