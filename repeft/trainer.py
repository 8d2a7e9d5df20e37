"""``AdapterTrainer``: transformers' ``Trainer`` for wrapped models.

The stock Trainer trains and evaluates a wrapped model (the wrapper shows the
base model's forward signature, from which Trainer takes label names and
dataset columns), but saves a non-``PreTrainedModel`` as its full state dict,
which fails on tied weights and is as big as the base model. This subclass
saves and restores only the adapter, so checkpoints are small and
``resume_from_checkpoint`` and ``load_best_model_at_end`` work on any model.
"""

from __future__ import annotations

from transformers import Trainer

from .files import read_adapter_dir
from .model import AdapterModel


class AdapterTrainer(Trainer):
    """A ``transformers.Trainer`` whose checkpoints hold the active adapter.

    >>> trainer = repeft.AdapterTrainer(model=wrapped, args=TrainingArguments("out"), train_dataset=ds)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    """

    def _adapter_model(self) -> AdapterModel:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, AdapterModel):
            raise TypeError(f"AdapterTrainer needs a model from repeft.wrap, got {type(model).__name__}")
        return model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self._adapter_model().save_adapter(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_adapter_from(self, checkpoint: str) -> None:
        model = self._adapter_model()
        _, tensors = read_adapter_dir(checkpoint)
        model.load_adapter_tensors(model.active_adapter, tensors, source=checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_adapter_from(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_adapter_from(self.state.best_model_checkpoint)
