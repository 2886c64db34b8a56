"""Which model a run or a tool builds: a checkpoint's stored description, with the flags given on top.

A checkpoint of this codebase carries ``model_description`` (``models.description.ModelDescription``); older
ones carry the run's ``args``, and the references' carry theirs. The model flags a user leaves out take the
stored values; a flag given explicitly wins, with a warning naming both values where they differ; an override
that cannot work with the stored weights (another width, another number of classes...) is refused in one line.

main.py (``--resume``, ``--eval``, ``--finetune``) and the inference API use these; main.py supplies its parser
and defaults, so that nothing here imports the command line.
"""
from __future__ import annotations

import argparse
import copy
import logging
import shlex
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from models.description import SHAPE_FIELDS, ModelDescription
from util.checkpoint import newest_checkpoint, read_checkpoint_entries
from util.errors import InputError

logger = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parent
# The description's fields that are flags too (categories, mean and std come from the data).
FLAG_FIELDS = tuple(name for name in ModelDescription.field_names() if name not in ("categories", "mean", "std"))
PREPROCESSING_FIELDS = ("val_size", "max_size")


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations of the flags ``argv`` gives explicitly (parsed by a copy of ``parser`` whose defaults
    are all suppressed)."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:  # argparse has no public way to list what was given
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(list(argv))))


def config_script_flags(path: str | Path) -> list[str]:
    """The main.py flags of a configs/*.sh script (the words after ``main.py``, up to ``"$@"``), without
    --output_dir (where training writes, nothing to do with the model). A relative path that does not exist
    from here is looked up in the project (``configs/x.sh`` works from any folder)."""
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and (PROJECT / path).is_file():
        path = PROJECT / path
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in (PROJECT / "configs").glob("*.sh")))
        raise InputError(f"config script not found: {path} (the configs are: {known})")
    words = shlex.split(path.read_text().replace("\\\n", " "), comments=True)
    after = [i for i, word in enumerate(words) if word.endswith("main.py")]
    if not after:
        raise InputError(f"{path} is not a config script: it runs no main.py (see configs/*.sh)")
    flags = []
    for word in words[after[0] + 1:]:
        if word == "$@":
            break
        flags.append(word)
    if "--output_dir" in flags:
        index = flags.index("--output_dir")
        del flags[index:index + 2]
    return flags


# The references' spellings of flag values that users copy from their READMEs and configs, and ours.
REFERENCE_SPELLINGS = {"backbone": {"swin-t": "swin_tiny"}}


def backbone_name(value: str) -> str:
    """``--backbone`` value: ours, or the reference's spelling of it (Sparse DETR's configs say ``swin-t``)."""
    return REFERENCE_SPELLINGS["backbone"].get(value, value)


def stored_flags(checkpoint: Mapping[str, Any], *, source: Any) -> Optional[dict[str, Any]]:
    """The model a checkpoint stores, as flag values: every field of its description (checked first: a damaged
    or hostile one raises InputError naming the field), else the model flags among its saved ``args`` (older
    checkpoints of this codebase, the references'), else None (weights only)."""
    if checkpoint.get("model_description") is not None:
        return ModelDescription.from_dict(checkpoint["model_description"], source=str(source)).to_dict()
    saved = checkpoint.get("args")
    if saved is None:
        return None
    if isinstance(saved, argparse.Namespace):
        saved = vars(saved)
    if not isinstance(saved, Mapping):
        raise InputError(f"{source}: its 'args' entry is a {type(saved).__name__}, not the run's flags; give the "
                         "model flags (or a configs/*.sh script) instead")
    flags = {name: saved[name] for name in FLAG_FIELDS if saved.get(name) is not None}
    if isinstance(flags.get("backbone"), str):
        flags["backbone"] = backbone_name(flags["backbone"])
    return flags


def cannot_change(name: str, stored: Mapping[str, Any], value: Any) -> bool:
    """Whether the stored weights cannot serve a model whose ``name`` is ``value``: the field fixes tensor
    shapes, or it does for these values (Sparse DETR's scoring network exists only with rho > 0; learned
    queries exist only without two-stage)."""
    if name in SHAPE_FIELDS:
        return True
    if name == "rho":
        return bool(stored.get("rho")) != bool(value)
    return name == "num_queries" and not stored.get("two_stage")


def adopt_stored_flags(args: argparse.Namespace, stored: Mapping[str, Any], given: set[str], *, source: Any,
                       strict: bool, fields: Sequence[str] = FLAG_FIELDS) -> None:
    """Set each of ``fields`` of ``args`` that the checkpoint stores (``stored``: :func:`stored_flags`) and the
    user did not give (not in ``given``) to the stored value. A given value that differs is kept, with a warning
    naming both; with ``strict`` (the stored weights will be loaded as they are) one that :func:`cannot_change`
    raises InputError in one line instead."""
    refused = []
    for name in fields:
        if name not in stored:
            continue
        value = stored[name]
        if name not in given:
            setattr(args, name, value)
            continue
        current = getattr(args, name)
        if current == value:
            continue
        if strict and cannot_change(name, stored, current):
            refused.append((name, current, value))
        else:
            logger.warning("--%s %s given; the model of %s was trained with %s: using %s", name, current, source,
                           value, current)
    if refused:
        raise InputError(f"{source} cannot be loaded with {', '.join(f'--{n} {c}' for n, c, _ in refused)}: its weights "
                         f"were trained with {', '.join(f'--{n} {v}' for n, _, v in refused)}; drop those flags (the "
                         "checkpoint supplies them), or use --finetune to load only the tensors that fit")


def adopt_checkpoint_flags(args: argparse.Namespace, given: set[str]) -> None:
    """With ``--resume`` (or ``--eval``), the model flags not in ``given`` take the checkpoint's stored values and
    a given one that cannot load its weights is refused; with ``--finetune``, the architecture flags (not the
    sizes) do, and every override is allowed (only the tensors that fit are loaded). Nothing happens for a
    checkpoint that stores no model, or a path that does not exist yet (``--resume auto`` of a fresh run)."""
    # --resume auto: the checkpoint the run will resume (util.checkpoint.resolve_resume), if any.
    resume = newest_checkpoint(Path(args.output_dir)) if args.resume == "auto" else Path(args.resume)
    if args.resume and resume is not None and resume.is_file():
        path, fields, strict = resume, FLAG_FIELDS, True
    elif args.finetune and Path(args.finetune).is_file():  # also --resume auto of a fresh run
        path, strict = Path(args.finetune), False
        fields = tuple(f for f in FLAG_FIELDS if f not in PREPROCESSING_FIELDS)
    else:
        return
    try:
        entries = read_checkpoint_entries(path, ("model_description", "args"), trust=args.trust_checkpoint)
    except (InputError, OSError):  # unreadable or untrusted: loading it for the run says so, with the fix
        return
    try:
        stored = stored_flags(entries, source=path)
        if stored is not None:
            adopt_stored_flags(args, stored, given, source=path, strict=strict, fields=fields)
    except InputError as err:  # main.py's flag errors are SystemExits
        raise SystemExit(f"error: {err}") from None
