"""SugarConfig: what a conversion does, as a frozen dataclass that round-trips to JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from ..errors import ParameterError
from ..options import DEFAULT_SAVE, DEFAULT_SURROGATE, OpOptions

from .activations import ACTIVATIONS, relufy_kinds

__all__ = ["SugarConfig", "resolve_options"]


@dataclass(frozen=True)
class SugarConfig:
    """How ``sugarize`` converts a model.

    Attributes:
        surrogate: registered surrogate name for ReLU sites (default B-SiLU).
        params: surrogate parameters; missing ones take the surrogate's defaults.
        negative_only: ReLU's exact gradient 1 for x > 0; s' only for x <= 0.
        save: what the backward keeps: "full" (default, exact) or the opt-in compressed
            "bfloat16" / "uint8" (their error: ``sugarize.save_error``).
        include: module-path globs; when given, only sites under a matching path convert.
        exclude: module-path globs whose sites are left alone (wins over include).
        relufy: also turn these activations into ReLU forward + SUGAR ("gelu", "silu").
            Their surrogate is their own derivative unless ``relufy_surrogate`` names one.
        relufy_surrogate: surrogate for relufied sites instead of the activation's own.
        fuse_bn: on the fx path, fuse each exact SUGAR site fed by a BatchNorm (directly or
            through a residual add) with it, so that its eager backward rebuilds x from
            BatchNorm's input instead of keeping a copy (the same values; less memory).
            False keeps every site apart.
        fuse_linear: on the fx path, fuse each exact SUGAR site read only by an ``nn.Linear``
            (``linear(sugar(x))``), or by a product read only by one (a gated MLP's
            ``down(sugar(gate(h)) * up(h))``), with it, so that its backward rebuilds ``relu(x)``
            (and the product) from x instead of keeping them (the same values; less memory).
    """

    surrogate: str = DEFAULT_SURROGATE
    params: Mapping[str, float] = field(default_factory=dict)
    negative_only: bool = False
    save: str = DEFAULT_SAVE
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    relufy: tuple[str, ...] = ()
    relufy_surrogate: str | None = None
    fuse_bn: bool = True
    fuse_linear: bool = True

    def __post_init__(self) -> None:
        from ..method.saved import check_options
        from ..method.surrogates import resolve_params

        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        relufy = tuple(dict.fromkeys(_expand_relufy(self.relufy)))
        object.__setattr__(self, "relufy", relufy)
        check_options(self.surrogate, self.params, self.negative_only, self.save)
        object.__setattr__(self, "params", resolve_params(self.surrogate, self.params))
        if self.relufy_surrogate is not None:
            check_options(self.relufy_surrogate, {}, self.negative_only, self.save)

    def decide(self, kind: str, path: str) -> tuple[bool, str]:
        """(convert?, reason) for an activation site of ``kind`` at module ``path``: one rule
        for the fx pass and the runtime path."""
        from fnmatch import fnmatch

        row = ACTIVATIONS[kind]
        if row.skip:
            return False, row.skip
        if kind != "relu" and kind not in self.relufy:
            return False, f"not a ReLU; relufy=('{row.relufy}',) (--relufy {row.relufy}) turns it into ReLU + SUGAR"

        def hit(globs) -> str | None:
            return next((g for g in globs if fnmatch(path, g) or fnmatch(path, g + ".*")), None)

        if self.include and hit(self.include) is None:
            return False, f"not under --include {', '.join(self.include)}"
        glob = hit(self.exclude)
        if glob is not None:
            return False, f"excluded by {glob!r}"
        return True, ""

    def surrogate_for(self, kind: str) -> tuple[str, list[float]]:
        """(surrogate, parameter list) used at a site of activation ``kind``."""
        from ..method.surrogates import resolve_params

        if kind == "relu":
            return self.surrogate, list(self.params.values())
        name = self.relufy_surrogate or ACTIVATIONS[kind].surrogate
        return name, list(resolve_params(name).values())

    def op_options(self, kind: str) -> OpOptions:
        """The SUGAR op's options at a site of activation ``kind``."""
        surrogate, params = self.surrogate_for(kind)
        return OpOptions(surrogate, tuple(params), self.negative_only, self.save)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params"] = dict(self.params)
        for key in ("include", "exclude", "relufy"):
            d[key] = list(d[key])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SugarConfig":
        """The config a ``to_dict`` wrote (a JSON file, a checkpoint's recipe), every field's type checked.

        Raises:
            ParameterError: naming an unknown field or one of the wrong type.
        """
        if not isinstance(data, Mapping):
            raise ParameterError(f"a config is a mapping of fields, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ParameterError(
                f"unknown config field {unknown[0]!r}; known fields: {', '.join(sorted(known))}"
            )
        for name, value in data.items():
            if not _FIELD_TYPES[name](value):
                raise ParameterError(f"config field {name!r} holds {type(value).__name__} {value!r:.40}, which it "
                                     f"cannot be ({_FIELD_DOCS[name]})")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str) -> "SugarConfig":
        return cls.from_dict(json.loads(text))


def _strings(v) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_FIELD_TYPES = {
    "surrogate": lambda v: isinstance(v, str),
    "params": lambda v: isinstance(v, Mapping) and all(isinstance(k, str) and _number(x) for k, x in v.items()),
    "negative_only": lambda v: isinstance(v, bool),
    "save": lambda v: isinstance(v, str),
    "include": _strings, "exclude": _strings,
    "relufy": lambda v: isinstance(v, str) or _strings(v),
    "relufy_surrogate": lambda v: v is None or isinstance(v, str),
    "fuse_bn": lambda v: isinstance(v, bool),
    "fuse_linear": lambda v: isinstance(v, bool),
}
_FIELD_DOCS = {"surrogate": "a surrogate name", "params": "names to numbers", "negative_only": "true or false",
               "save": "a save mode", "include": "a list of module-path globs", "exclude": "a list of module-path globs",
               "relufy": "a list of activation names", "relufy_surrogate": "a surrogate name or null",
               "fuse_bn": "true or false", "fuse_linear": "true or false"}


def _expand_relufy(kinds) -> list[str]:
    if isinstance(kinds, str):
        kinds = [k for k in kinds.split(",") if k.strip()]
    out = []
    for kind in kinds:
        kind = kind.strip().lower()
        kinds = relufy_kinds(kind) or ([kind] if kind in ACTIVATIONS and ACTIVATIONS[kind].relufy else [])
        if not kinds:
            words = sorted({row.relufy for row in ACTIVATIONS.values() if row.relufy})
            raise ParameterError(f"relufy: unknown activation {kind!r}; choose from {', '.join(words)}")
        out += kinds
    return out


def resolve_options(config: SugarConfig | None, *, keywords_are: str = "keywords", config_is: str = "config=",
                    spelled: Mapping[str, str] | None = None, **keywords) -> SugarConfig:
    """The conversion's options: the keywords, or ``config`` when given. A keyword equal to its
    default or to ``config``'s value is fine; one that differs from both is an error: options are
    never silently dropped. The one rule for the library (``sugarize(..., config=)``) and the CLI
    (``convert --config`` with flags: ``keywords_are="flags"``, ``config_is="--config FILE"``,
    ``spelled`` mapping each keyword to its flag, so the message names what the user typed).

    Raises:
        ParameterError: naming the option that contradicts the config.
    """
    if config is None:
        return SugarConfig(**keywords)
    defaults = SugarConfig()
    for name, value in keywords.items():
        given = value if name != "relufy" else SugarConfig(relufy=value).relufy
        if name == "params":
            if value and SugarConfig(surrogate=config.surrogate, params=value).params != dict(config.params):
                shown = f"{spelled['params']} " if spelled and "params" in spelled else ""
                raise ParameterError(f"{shown}surrogate parameters {dict(value)} contradict config.params "
                                     f"{dict(config.params)}: pass options either as {keywords_are} or in "
                                     f"{config_is}")
            continue
        if given != getattr(defaults, name) and given != getattr(config, name):
            shown = f"{spelled[name]} {value}" if spelled and name in spelled else f"{name}={value!r}"
            raise ParameterError(f"{shown} contradicts config.{name}={getattr(config, name)!r}: pass "
                                 f"options either as {keywords_are} or in {config_is}, not both")
    return config
