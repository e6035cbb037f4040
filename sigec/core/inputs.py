"""Checks every compiled engine makes on each call: the call matches the example inputs, and the
weights the graphs read are still the model's (not moved, not replaced). One implementation,
shared by ``sigec.core.engine.Engine`` and ``sigec.temporal.TemporalEngine``, so that both refuse the
same misuse with the same messages."""
from __future__ import annotations

import weakref
from typing import Any, Callable, Optional, Sequence

import torch
from torch.fx._pytree import tree_flatten_spec


def flatten_inputs(args: tuple, kwargs: dict, in_spec, input_names: Sequence[str], examples: Sequence[Any],
                   device: Optional[torch.device], error: type[Exception]) -> list:
    """``(args, kwargs)`` flattened in the order of the captured graph's inputs, each tensor checked
    against its example (tensor, shape, dtype, and ``device`` when given); ``error`` is raised."""
    try:
        flat = tree_flatten_spec((args, kwargs), in_spec)
    except Exception as exc:
        raise error(f"the call's arguments do not match the example inputs' structure ({list(input_names)}): "
                    f"{exc}") from exc
    for name, value, example in zip(input_names, flat, examples):
        if isinstance(example, torch.Tensor):
            if not isinstance(value, torch.Tensor):
                raise error(f"input {name!r} must be a tensor, got {type(value).__name__}")
            if device is not None and value.device != device:
                raise error(f"input {name!r} is on {value.device} but the engine's weights are on {device}; move "
                            "the input, or the model and compile again")
            if tuple(value.shape) != tuple(example.shape) or value.dtype != example.dtype:
                raise error(f"input {name!r} has shape {tuple(value.shape)} and dtype {value.dtype}, but the engine "
                            f"was compiled for {tuple(example.shape)} and {example.dtype}; compile again with "
                            "example inputs of the new shape")
    return list(flat)


def owners(model: torch.nn.Module, names: list[str]) -> list:
    """``(weakref to the submodule, attribute)`` holding each named parameter or buffer; the
    reference is dead when the model has no such submodule (the name then is never checked)."""
    found = []
    for name in names:
        path, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            module = None
        found.append((weakref.ref(module) if module is not None else (lambda: None), leaf))
    return found


def check_identity(watched: Sequence[tuple[str, torch.Tensor, int]], placement: Sequence[tuple],
                   found_owners: Sequence[tuple], error: type[Exception]) -> None:
    """Raise ``error`` if a watched ``(name, tensor, id)`` changed dtype or device since its
    ``placement`` ``(dtype, device)`` was taken, or if its owner (from ``owners``) now holds
    another tensor under that name: the compiled graphs would compute with the old one."""
    for (name, t, _), (dtype, device) in zip(watched, placement):
        if t.dtype != dtype or t.device != device:
            raise error(f"the model was moved after compile ({name!r} is now {t.dtype} on {t.device}, compiled for "
                        f"{dtype} on {device}): call sigec.compile again")
    for (name, _, ident), (owner, leaf) in zip(watched, found_owners):
        module = owner()
        current = None if module is None else module._parameters.get(leaf, module._buffers.get(leaf))
        if current is not None and id(current) != ident:
            raise error(f"parameter or buffer {name!r} was replaced by a new tensor after compile; the compiled "
                        "graphs still read the old one: call sigec.compile again")


def refuse_move(probe: Optional[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor],
                error: type[Exception]) -> None:
    """For ``nn.Module._apply``: raise ``error`` before anything changes if ``fn`` (``.to``, ``.half``,
    ``.cuda`` ...) would change ``probe``'s dtype or device; the graphs are specialized to both."""
    if probe is None:
        return
    moved = fn(probe)
    if moved.dtype != probe.dtype or moved.device != probe.device:
        raise error(f"a compiled engine cannot move from {probe.dtype} on {probe.device} to {moved.dtype} on "
                    f"{moved.device}: its graphs are specialized to both. Move the model (model.to(...)) and call "
                    "sigec.compile again")


def state_versions(watched: Sequence[tuple]) -> tuple:
    """``(data_ptr, version)`` of each watched tensor (the second item of each entry): changes when a
    weight is updated in place."""
    return tuple((entry[1].data_ptr(), entry[1]._version) for entry in watched)
