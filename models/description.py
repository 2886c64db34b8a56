"""The model description: everything needed to rebuild and run a trained model, as plain data.

A :class:`ModelDescription` holds the flags that change the model's tensors or outputs, the preprocessing
(validation sizes, normalisation) and the classes of the training set. It is written into every checkpoint
(``checkpoint["model_description"]``, a dict of plain values that ``torch.load(weights_only=True)`` reads) and
into ``<output_dir>/config.json``; every tool and the inference API rebuild the model from it.

    description = ModelDescription.from_flags(vars(args), categories=[(1, "person"), ...])
    description.to_dict()                       # JSON-ready
    ModelDescription.from_dict(stored)          # checked: types, choices, bounds; InputError names the field

Training-only flags (learning rates, loss weights, logging) are not part of it: they never block loading.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Iterable, Mapping, Optional, Sequence

from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from util.errors import InputError

from .token_selection import RULES as TOKEN_SELECTION_RULES

MODELS = ("deformable", "detr", "sdetr")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "swin_tiny")

# Bounds that no trainable model of this family reaches; a stored value beyond them is a damaged or hostile
# file, refused before anything is allocated.
COUNT_BOUNDS = {
    "num_feature_levels": (1, 8), "hidden_dim": (1, 4096), "dim_feedforward": (1, 65536), "nheads": (1, 256),
    "enc_layers": (1, 64), "dec_layers": (1, 64), "num_queries": (1, 10000), "enc_n_points": (1, 64),
    "dec_n_points": (1, 64), "num_classes": (1, 100000), "val_size": (1, 8192), "max_size": (1, 16384),
    "sdetr_stage1_enc_layers": (1, 64), "sdetr_stage1_enc_heads": (1, 256), "sdetr_stage1_dec_layers": (1, 64),
    "sdetr_stage1_dec_heads": (1, 256), "sdetr_stage2_enc_layers": (1, 64), "sdetr_stage2_enc_heads": (1, 256),
    "sdetr_stage2_dec_layers": (1, 64), "sdetr_stage2_dec_heads": (1, 256),
}
# token_selection: the registered rules (models/token_selection.py), looked up when checked.
CHOICES = {"model": MODELS, "backbone": BACKBONES, "backbone_norm": ("frozen", "batch"),
           "position_embedding": ("sine", "learned"), "token_selection": TOKEN_SELECTION_RULES}
MAX_CATEGORIES = 100000
MAX_NAME_LENGTH = 1000

# Fields whose value fixes the state dict's keys or shapes: a checkpoint's weights load only with its own value.
SHAPE_FIELDS = (
    "model", "backbone", "backbone_norm", "num_feature_levels", "hidden_dim", "dim_feedforward", "nheads",
    "enc_layers", "dec_layers", "enc_n_points", "dec_n_points", "num_classes", "with_box_refine", "two_stage",
    "eff_query_init", "use_enc_aux_loss", "position_embedding", "token_selection", "sdetr_stage1_enc_layers",
    "sdetr_stage1_enc_heads", "sdetr_stage1_dec_layers", "sdetr_stage1_dec_heads", "sdetr_stage2_enc_layers",
    "sdetr_stage2_enc_heads", "sdetr_stage2_dec_layers", "sdetr_stage2_dec_heads",
)


@dataclass(frozen=True)
class ModelDescription:
    """A trained model, as plain values. The fields named like main.py's flags mean what those flags mean;
    ``categories`` are the training set's ``(id, name)`` pairs (empty when unknown, e.g. official checkpoints);
    ``mean`` / ``std`` normalise RGB values in [0, 1]."""

    num_queries: int
    dim_feedforward: int
    model: str = "deformable"
    backbone: str = "resnet50"
    backbone_norm: str = "frozen"
    dilation: bool = False
    position_embedding: str = "sine"
    position_embedding_scale: float = 2 * math.pi
    num_feature_levels: int = 4
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    enc_n_points: int = 4
    dec_n_points: int = 4
    dropout: float = 0.1
    pre_norm: bool = False
    aux_loss: bool = True
    with_box_refine: bool = False
    two_stage: bool = False
    eff_query_init: bool = False
    eff_specific_head: bool = False
    rho: float = 0.0
    token_selection: str = "dam"  # absent from descriptions written before the objectness rule: theirs is dam
    use_enc_aux_loss: bool = False
    sdetr_stage1_enc_layers: int = 3
    sdetr_stage1_enc_heads: int = 8
    sdetr_stage1_dec_layers: int = 3
    sdetr_stage1_dec_heads: int = 8
    sdetr_stage2_enc_layers: int = 3
    sdetr_stage2_enc_heads: int = 1
    sdetr_stage2_dec_layers: int = 3
    sdetr_stage2_dec_heads: int = 8
    num_classes: int = 91
    categories: tuple[tuple[int, str], ...] = ()
    val_size: int = 800
    max_size: int = 1333
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        check_description(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any], *,
                   categories: Optional[Iterable[tuple[int, str]]] = None) -> "ModelDescription":
        """The description of the model that main.py's parsed flags ``flags`` (``vars(args)``) build; the fields
        the flags lack keep their defaults. ``categories``: the training set's ``(id, name)`` pairs (or ``{"id", "name"}`` dicts)."""
        values = {name: flags[name] for name in cls.field_names() if name in flags and flags[name] is not None}
        values.pop("categories", None)
        if categories is not None:
            values["categories"] = list(categories)
        return cls.from_dict(values, source="the flags")

    @classmethod
    def from_dict(cls, stored: Any, *, source: str = "the checkpoint") -> "ModelDescription":
        """A description from its :meth:`to_dict` form, checked before anything is built: unknown fields are
        ignored (a newer writer), missing ones take their defaults (an older one), and a value of the wrong
        type or out of bounds raises one InputError line naming the field and ``source``."""
        if not isinstance(stored, Mapping):
            raise InputError(f"{source}: the model description must be a dict of fields, got {type(stored).__name__}")
        values = {}
        for spec in fields(cls):
            if spec.name not in stored:
                if spec.default is MISSING:
                    raise InputError(f"{source}: the model description lacks {spec.name!r}")
                continue
            values[spec.name] = _coerce(spec.name, spec.type, stored[spec.name], source)
        try:
            return cls(**values)
        except InputError as error:
            raise InputError(f"{source}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: lists for the tuples, categories as ``[{"id", "name"}]``."""
        out = asdict(self)
        out["categories"] = [{"id": i, "name": n} for i, n in self.categories]
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    def class_names(self) -> dict[int, str]:
        """Names by category id, from the training set (empty when the description has none)."""
        return dict(self.categories)

    def summary(self) -> str:
        """One line a person reads: the variant, its sizes and classes."""
        if self.model == "deformable":
            selection = "" if self.token_selection == "dam" else f" ({self.token_selection} selection)"
            variant = (f"Sparse DETR rho {self.rho:g}{selection}" if self.rho else
                       "Efficient DETR" if self.eff_query_init else
                       "Deformable DETR two-stage" if self.two_stage else
                       "Deformable DETR box refine" if self.with_box_refine else "Deformable DETR")
            layers = f"{self.enc_layers}+{self.dec_layers} layers"
        else:
            variant = self.model.upper()
            layers = (f"{self.enc_layers}+{self.dec_layers} layers" if self.model == "detr" else
                      f"{self.sdetr_stage1_enc_layers}+{self.sdetr_stage1_dec_layers} / "
                      f"{self.sdetr_stage2_enc_layers}+{self.sdetr_stage2_dec_layers} layers")
        classes = f"{len(self.categories)} named classes" if self.categories else f"{self.num_classes} class outputs"
        return (f"{variant} on {self.backbone}, width {self.hidden_dim}, {layers}, {self.num_queries} queries, "
                f"{classes}, images {self.val_size}/{self.max_size} px")

    def differences(self, other: "ModelDescription") -> list[tuple[str, Any, Any]]:
        """``(field, self's value, other's value)`` for every field that differs."""
        return [(name, getattr(self, name), getattr(other, name)) for name in self.field_names()
                if getattr(self, name) != getattr(other, name)]


def _coerce(name: str, annotation: str, value: Any, source: str) -> Any:
    """``value`` as the field's type (ints stay ints, a bool is not an int, lists become tuples), or InputError."""
    def bad(expected: str) -> InputError:
        shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
        return InputError(f"{source}: model description field {name!r} must be {expected}, got {shown}")

    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if annotation == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if annotation == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if annotation.startswith("tuple[float"):
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            raise bad("3 finite numbers (R, G, B)")
        return tuple(float(v) for v in value)
    # categories: [{"id", "name"}] as stored, or (id, name) pairs
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) > MAX_CATEGORIES:
        raise bad(f"a list of at most {MAX_CATEGORIES} {{id, name}} entries")
    pairs = []
    for entry in value:
        pair = (entry.get("id"), entry.get("name")) if isinstance(entry, Mapping) else entry
        if (not isinstance(pair, Sequence) or len(pair) != 2 or isinstance(pair[0], bool)
                or not isinstance(pair[0], int) or not isinstance(pair[1], str) or len(pair[1]) > MAX_NAME_LENGTH):
            raise bad("a list of {id: integer, name: string} entries")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def check_description(description: ModelDescription) -> None:
    """InputError naming the first field out of its choices or bounds (see :data:`COUNT_BOUNDS`)."""
    for name, choices in CHOICES.items():
        if getattr(description, name) not in choices:
            raise InputError(f"model description field {name!r} is {getattr(description, name)!r}; expected one of "
                             f"{', '.join(choices)}")
    for name, (low, high) in COUNT_BOUNDS.items():
        value = getattr(description, name)
        if not low <= value <= high:
            raise InputError(f"model description field {name!r} is {value}, outside [{low}, {high}]")
    if not 0.0 <= description.rho <= 1.0:
        raise InputError(f"model description field 'rho' is {description.rho}, outside [0, 1]")
    if not 0.0 <= description.dropout < 1.0:
        raise InputError(f"model description field 'dropout' is {description.dropout}, outside [0, 1)")
    if min(description.std) <= 0:
        raise InputError(f"model description field 'std' is {list(description.std)}: every value must be > 0")
    ids = [i for i, _ in description.categories]
    if len(set(ids)) != len(ids):
        raise InputError("model description field 'categories' repeats a category id")

