"""plora: PeriodicLoRA for PEFT LoRA models.

Public API (a few verbs):

- ``PLoRAConfig``: what to unload, when, and how.
- ``PeriodicUnloader(model, optimizer, config)``: call ``.step()`` after each optimizer step.
- ``unload_(model, momentum=1.0)``: one unload, now.
- ``PLoRACallback(config)``: the same for transformers ``Trainer`` / TRL ``SFTTrainer``.
- ``plora.analysis``: spectra and ranks of the accumulated update.
"""

from plora.config import PLoRAConfig
from plora.unload import UnloadStats, unload_
from plora.unloader import PeriodicUnloader

__version__ = "0.1.0"

__all__ = ["PLoRAConfig", "PeriodicUnloader", "PLoRACallback", "UnloadStats", "unload_", "__version__"]


def __getattr__(name):
    # The callback imports transformers; keep `import plora` light and trainer-free.
    if name == "PLoRACallback":
        from plora.callback import PLoRACallback

        return PLoRACallback
    if name == "analysis":
        import importlib

        return importlib.import_module("plora.analysis")
    raise AttributeError(f"module 'plora' has no attribute {name!r}")
