"""What a resume needs besides the adapter: the unloaded base weights and the unloader state.

A PEFT checkpoint holds only the adapter. After an unload the base weights differ from the
original model's, so a resume that reloads the original base silently loses every earlier
unload. ``save_unload_state`` writes the adapted layers' base weights (plus the compensated
residual buffers) to ``plora_base.safetensors`` and the counters to ``plora_state.json``;
``load_unload_state`` puts them back. Files are written to a temporary name and renamed, so an
interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BASE_FILE = "plora_base.safetensors"
STATE_FILE = "plora_state.json"
_RESIDUAL = "residual::"


def has_unload_state(directory: str | os.PathLike) -> bool:
    return (Path(directory) / STATE_FILE).is_file()


def save_unload_state(unloader, directory: str | os.PathLike) -> None:
    """Save base weights of the adapted layers, residuals and counters into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = unloader.state_dict()
    tensors = {layer.name: layer.weight.detach().contiguous() for layer in unloader.layers}
    for name, residual in state.pop("residuals").items():
        tensors[_RESIDUAL + name] = residual.detach().contiguous()
    tmp = directory / (BASE_FILE + ".tmp")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, directory / BASE_FILE)
    tmp = directory / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, directory / STATE_FILE)


@torch.no_grad()
def load_unload_state(unloader, directory: str | os.PathLike) -> None:
    """Restore what ``save_unload_state`` wrote: base weights (in place), residuals, counters."""
    directory = Path(directory)
    if not has_unload_state(directory) or not (directory / BASE_FILE).is_file():
        raise FileNotFoundError(f"no PLoRA state in {directory} (expected {STATE_FILE} and {BASE_FILE})")
    state = json.loads((directory / STATE_FILE).read_text())
    tensors = load_file(str(directory / BASE_FILE))
    residuals = {k[len(_RESIDUAL):]: v for k, v in tensors.items() if k.startswith(_RESIDUAL)}
    for layer in unloader.layers:
        if layer.name not in tensors:
            raise ValueError(f"{directory / BASE_FILE}: no base weight for layer {layer.name!r}")
        saved = tensors[layer.name]
        if saved.shape != layer.weight.shape:
            raise ValueError(
                f"{directory / BASE_FILE}: layer {layer.name!r} has shape {tuple(saved.shape)}, "
                f"the model's is {tuple(layer.weight.shape)}"
            )
        layer.weight.data.copy_(saved)
    state["residuals"] = residuals
    unloader.load_state_dict(state)
