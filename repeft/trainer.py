"""Adapter-only checkpoints for transformers' ``Trainer`` and its subclasses (TRL's ``SFTTrainer``, ...).

The stock Trainer trains and evaluates a wrapped model (the wrapper shows the
base model's forward signature, from which Trainer takes label names and
dataset columns), but it saves anything that is not a ``PreTrainedModel`` or a
``peft.PeftModel`` as its full state dict: as big as the base model in every
checkpoint (89 MB for MiniLM, ~14 GB for a 7B base). Trainer decides this by
``isinstance`` on its own and PEFT's classes, which a repeft model cannot
pass, so the choice is made on the trainer class instead: ``AdapterTrainer``
is ``Trainer`` with adapter-only checkpoints, and ``adapter_trainer(cls)``
gives any Trainer subclass the same (``adapter_trainer(trl.SFTTrainer)``).
Checkpoints hold the active adapter (with its trained heads, ``modules_to_save``),
and ``resume_from_checkpoint`` and ``load_best_model_at_end`` read them back.
"""

from __future__ import annotations

import functools

from transformers import Trainer

from .model import AdapterModel


class AdapterCheckpoints:
    """Trainer methods that save and restore only the adapter; mixed in before a Trainer class."""

    def _adapter_model(self) -> AdapterModel:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, AdapterModel):
            raise TypeError(f"{type(self).__name__} needs a model from repeft.wrap, got {type(model).__name__}")
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
        _, tensors = model.read_adapter(checkpoint)
        model.load_adapter_tensors(model.active_adapter, tensors, source=checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_adapter_from(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_adapter_from(self.state.best_model_checkpoint)


@functools.cache
def adapter_trainer(trainer_class: type[Trainer]) -> type[Trainer]:
    """``trainer_class`` (a ``transformers.Trainer`` subclass) whose checkpoints hold only the adapter.

    >>> from trl import SFTConfig, SFTTrainer  # doctest: +SKIP
    >>> trainer = repeft.adapter_trainer(SFTTrainer)(model=wrapped, args=SFTConfig("out"), train_dataset=ds)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    """
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"adapter_trainer takes a transformers.Trainer subclass, got {trainer_class!r}")
    if issubclass(trainer_class, AdapterCheckpoints):
        return trainer_class
    name = f"Adapter{trainer_class.__name__}"
    return type(name, (AdapterCheckpoints, trainer_class), {"__module__": __name__, "__qualname__": name})


class AdapterTrainer(AdapterCheckpoints, Trainer):
    """A ``transformers.Trainer`` whose checkpoints hold the active adapter.

    >>> trainer = repeft.AdapterTrainer(model=wrapped, args=TrainingArguments("out"), train_dataset=ds)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    """
