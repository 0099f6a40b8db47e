"""Fine-tuning: GPT-1 task heads (classify, entail, similar, choice), LoRA, merging."""

from .data import Example, TaskDataError, load_examples
from .lora import LoRAError, apply_lora, merge_lora
from .tasks import FinetuneConfig, FinetuneError, SFTConfig, TuneConfig, finetune, load_task, merge, predict

__all__ = ["Example", "TaskDataError", "load_examples", "LoRAError", "apply_lora", "merge_lora",
           "FinetuneConfig", "FinetuneError", "SFTConfig", "TuneConfig", "finetune", "load_task", "merge", "predict"]
