"""repeft: parameter-efficient fine-tuning adapters for Hugging Face models.

>>> import repeft
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
>>> model = repeft.wrap(base, repeft.RepLoRAConfig(r=4))
>>> model.trainable_parameters()[0] > 0
True
"""

__version__ = "0.1.0"

# Importing a method's module registers it; this order is the support table's (docs/support.md).
from . import lora as _lora  # noqa: F401,E402
from . import replora as _replora  # noqa: F401,E402
from . import prefix as _prefix  # noqa: F401,E402
from . import zero_init as _zero_init  # noqa: F401,E402
from . import vpt as _vpt  # noqa: F401,E402
from . import vapt as _vapt  # noqa: F401,E402
from .config import AdapterConfig  # noqa: E402
from .files import AdapterFileError  # noqa: E402
from .layers import AdapterLayer  # noqa: E402
from .lora import LoRAConfig, TaskType  # noqa: E402
from .model import AdapterModel, get_peft_model, load_adapter, wrap  # noqa: E402
from .peft_interop import export_peft, from_peft, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from .prefix import PrefixConfig, fold_prefix  # noqa: E402
from .replora import RepLoRAConfig  # noqa: E402
from .export import MergedExport, export_merged  # noqa: E402
from .quantization import float_module_names, prepare_quantized_model  # noqa: E402
from .targeting import TargetError  # noqa: E402
from .vapt import VAPTConfig  # noqa: E402
from .vpt import VPTConfig  # noqa: E402
from .zero_init import ZeroInitConfig  # noqa: E402

# PEFT's spellings, so a PEFT script changes only its import line (docs/api.md, "Coming from PEFT").
PeftModel = AdapterModel
LoraConfig = LoRAConfig

__all__ = [
    "AdapterConfig",
    "AdapterFileError",
    "AdapterLayer",
    "AdapterModel",
    "AdapterTrainer",
    "LoRAConfig",
    "LoraConfig",
    "MergedExport",
    "PeftModel",
    "PrefixConfig",
    "RepLoRAConfig",
    "TargetError",
    "TaskType",
    "VAPTConfig",
    "VPTConfig",
    "ZeroInitConfig",
    "export_merged",
    "adapter_trainer",
    "export_peft",
    "float_module_names",
    "fold_prefix",
    "from_peft",
    "get_peft_model",
    "get_peft_model_state_dict",
    "load_adapter",
    "prepare_quantized_model",
    "set_peft_model_state_dict",
    "wrap",
]


def __getattr__(name: str):
    # transformers.Trainer takes seconds to import; only pay for it when it is used.
    if name in ("AdapterTrainer", "adapter_trainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'repeft' has no attribute {name!r}")
