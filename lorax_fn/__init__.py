"""lorax_fn: LoRA for JAX as a function transform.

``lorafy`` rewrites a parameter pytree into frozen bases plus low-rank
adapters; ``lora(fn)`` runs any model function on it without building dense
weights; ``optimizer``/``split`` train only the adapters; ``merge`` folds them
back for plain jitted inference.
"""

from .errors import (ArgumentError, CheckpointError, LayoutError, LoraError, MaterializationError,
                     MaterializationWarning, NoAdapterWarning, RankError, StructureError, TargetDtypeError, TargetError)
from .inits import to_original_base
from .interpret import Use
from .lorafy import lorafy
from .merge import adapters, attach, base, merge
from .optim import combine, optimizer, split, trainable_mask
from .transform import Explanation, explain, lora
from .kinds import DoRA, DoraWeight, Full, FullWeight, LoRA, LoraWeight, MoRA, MoraWeight, kinds, register_kind
from .weight import Adapter, Layout, is_lora
from .quant.array import QuantizedArray, is_quantized
from .quant.tree import Quantization, dequantize, quantize
from .checkpoint import load_adapters, read_adapter_config, save_adapters, save_merged
from .peft import load_peft, save_peft
from .resume import AdapterCheckpointManager, Restored

__version__ = "0.1.0"

__all__ = [  # the public API: everything else is internal
    "Adapter", "DoRA", "DoraWeight", "Full", "FullWeight", "LoRA", "MoRA", "MoraWeight", "kinds", "register_kind",
    "ArgumentError", "Explanation", "Layout", "LayoutError", "LoraError", "LoraWeight", "MaterializationError",
    "MaterializationWarning", "NoAdapterWarning", "RankError", "StructureError", "TargetDtypeError", "TargetError",
    "Use", "adapters", "attach", "base", "combine", "explain", "is_lora", "lora", "lorafy",
    "Quantization", "QuantizedArray", "dequantize", "is_quantized", "quantize",
    "merge", "optimizer", "split", "to_original_base", "trainable_mask",
    "AdapterCheckpointManager", "CheckpointError", "Restored", "load_adapters", "load_peft",
    "read_adapter_config", "save_adapters", "save_merged", "save_peft",
]
