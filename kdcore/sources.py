"""How a frozen source is described before anything is built: the input it was trained with (`InputSpec`), the
flags that name a second source (`add_source_arguments`), and a distiller's declaration of one (`SourceSpec`).

The engine builds every source from these (engine/sources.py); a distiller only declares what it needs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .errors import UserError
from .features import FeatureRequest

if TYPE_CHECKING:
    import argparse


@dataclass(frozen=True)
class InputSpec:
    """How a model's input batch is normalised and sized: per-channel mean and std, (height, width)."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int]

    @classmethod
    def of_data_config(cls, config: Mapping[str, Any]) -> InputSpec:
        """A model's input as timm's data config describes it (mean, std, input_size)."""
        return cls.of(config["mean"], config["std"], config["input_size"])

    def with_overrides(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       size: int | Sequence[int] | None = None) -> InputSpec:
        """This spec with any of mean, std, size replaced (flags left unset keep the student's)."""
        return InputSpec.of(mean or self.mean, std or self.std, size or self.size)

    @classmethod
    def of(cls, mean: Sequence[float], std: Sequence[float], size: int | Sequence[int]) -> InputSpec:
        """A spec from any sequences of numbers.

        Args:
            mean: per-channel input mean.
            std: per-channel input std, each positive.
            size: a side (square input), or a shape whose last two entries are (height, width), e.g. timm's
                (C, H, W) `input_size`.

        Returns:
            The spec, with mean and std as float tuples and size as (height, width).

        Raises:
            UserError: when a std is zero or negative.
        """
        size = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        if any(s <= 0 for s in std):
            raise UserError(f"input std {tuple(std)} must be positive in every channel")
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std), size)


def add_input_spec_arguments(group: argparse._ActionsContainer, prefix: str, whose: str) -> None:
    """PREFIX-mean, PREFIX-std, PREFIX-img-size: the input a frozen source was trained with (`InputSpec`), each
    defaulting to the student's.

    Args:
        group: the parser or argument group the flags are added to.
        prefix: the flags' common start, e.g. '--teacher'.
        whose: the source as the help texts name it, e.g. 'the teacher'.
    """
    group.add_argument(f"{prefix}-mean", type=float, nargs=3, default=None, metavar="M",
                       help=f"input mean {whose} was trained with (default: the student's)")
    group.add_argument(f"{prefix}-std", type=float, nargs=3, default=None, metavar="S",
                       help=f"input std {whose} was trained with (default: the student's)")
    group.add_argument(f"{prefix}-img-size", type=int, default=None,
                       help=f"input size of {whose}; batches are resized to it (default: the student's)")


def add_source_arguments(group: argparse._ActionsContainer, prefix: str, whose: str) -> None:
    """The flags of a second frozen source, given either as a cache or as a live model:
    PREFIX-cache DIR, PREFIX-source MODEL, PREFIX-source-pretrained PATH and PREFIX-source-mean/std/img-size.

    Args:
        group: the parser or argument group the flags are added to.
        prefix: the flags' common start, e.g. '--richkd' (the `SourceSpec.prefix` that reads them back).
        whose: the source as the help texts name it, e.g. 'second source' ('cached second source', ...).
    """
    group.add_argument(f"{prefix}-cache", default="", help=f"cached {whose} (tools/build_cache.py)")
    group.add_argument(f"{prefix}-source", default="", help=f"live {whose}: a timm model name")
    group.add_argument(f"{prefix}-source-pretrained", default="", help="the live source's checkpoint")
    add_input_spec_arguments(group, f"{prefix}-source", "the live source")


@dataclass(frozen=True)
class SourceSpec:
    """A second frozen source a distiller declares (`Distiller.extra_sources`): the flag prefix its
    `add_source_arguments` flags were added under, and what it must hand out. `name` is the keyword under which
    its `Features` reach `distill_losses`."""
    name: str
    prefix: str  # e.g. "--richkd": --richkd-cache, --richkd-source, ...
    request: FeatureRequest
    role: str = "second source"

    def flag(self, suffix: str = "") -> str:
        """The flag PREFIX-suffix (PREFIX itself for no suffix), e.g. '--richkd-cache' for 'cache'."""
        return f"{self.prefix}-{suffix}" if suffix else self.prefix

    def value(self, args: argparse.Namespace, suffix: str) -> Any:
        """The parsed value of PREFIX-suffix."""
        return getattr(args, self.flag(suffix).lstrip("-").replace("-", "_"))
