"""The one path from a model to a compiled module: check the model and its example inputs, capture
it once, hand the captured program to the mode that was asked for.

A *mode* (spatial edits, temporal reuse, tiling) checks its own options when it is constructed and
only analyses and builds in ``build``; it never captures or re-checks the model. ``sigec.compile``
picks the mode; ``sigec.tiling.compile_tiled`` and ``sigec.temporal.compile_temporal`` name theirs
directly. Both come through ``compile_in_mode``, so ``capture`` has one caller.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Protocol

import torch

from sigec.core.capture import Captured, capture

ModelLike = "torch.nn.Module | torch.export.ExportedProgram"


@dataclasses.dataclass(frozen=True)
class Program:
    """A captured model, as every mode receives it.

    Attributes:
        captured: the flat ATen graph with its calling convention (``sigec.core.capture``).
        model: what the user passed (an ``nn.Module`` or an ``ExportedProgram``).
        example_args, example_kwargs: the example inputs it was captured with.
        recapture: captures the same model at other example inputs, for a mode that needs the model
            at a second size (tiling's preview pass); it goes through this module's one capture.
    """

    captured: Captured
    model: object
    example_args: Optional[tuple]
    example_kwargs: Optional[dict]
    recapture: Callable[[tuple, dict], Captured]

    @property
    def source(self) -> Optional[torch.nn.Module]:
        """The user's module, whose parameters the engines watch (``None`` for an ``ExportedProgram``)."""
        return self.model if isinstance(self.model, torch.nn.Module) else None


class Mode(Protocol):
    #: the error raised when the model or its example inputs do not fit this mode
    input_error: type[Exception]
    #: the compiled module's calls take ``mask=``, so no model input may be a keyword named ``mask``
    takes_edit_mask: bool

    def build(self, program: Program) -> torch.nn.Module:
        """Analyse the captured program and build the compiled module."""


def check_model(model: ModelLike, example_kwargs: Optional[dict], mode: Mode) -> None:
    """Refuse what no mode can compile faithfully, before the (slow) capture."""
    if mode.takes_edit_mask and example_kwargs and "mask" in example_kwargs:
        raise mode.input_error("the model takes a keyword input named 'mask', which is the engine's own edit-mask "
                               "argument; pass the model's mask positionally in example_args (and in calls)")
    if isinstance(model, torch.nn.Module) and model.training:
        raise mode.input_error(f"{type(model).__name__} is in training mode (dropout and batch norm would not "
                               "match an eval run, and batch norm would update its statistics): call model.eval() "
                               "before sigec.compile")


def compile_in_mode(mode: Mode, model: ModelLike, example_args=None,
                    example_kwargs: Optional[dict] = None) -> torch.nn.Module:
    """Check ``model`` and its example inputs, capture it once, and build ``mode``'s module from it."""
    check_model(model, example_kwargs, mode)
    if example_args is not None and not isinstance(example_args, tuple):
        example_args = (example_args,)

    def capture_at(args: Optional[tuple], kwargs: Optional[dict]) -> Captured:
        return capture(model, args, kwargs)

    program = Program(capture_at(example_args, example_kwargs), model, example_args, example_kwargs, capture_at)
    return mode.build(program)
