"""The training loop: optimizer steps until ``total_steps``, and after each the hooks that log, evaluate and save.

Exact resume rests on three things: the train loader shuffles with accelerate's
seedable sampler (order = f(seed, epoch), the same on every process count),
a resumed run skips the batches already seen with ``skip_first_batches``, and
each micro-batch reseeds torch's RNG from (seed, micro-batch, rank), so dropout
does not depend on what ran before.
"""

from __future__ import annotations

import sys
import time

import torch
from tqdm.auto import tqdm

from .. import fsdp
from ..checkpoint import latest_checkpoint
from . import resume
from .evaluation import evaluate_run
from .run import LineTrackingStream, Run


class TrainingDiverged(RuntimeError):
    """The loss or the adapter became NaN or infinite; the run stopped before writing anything of it."""


def loop(run: Run) -> None:
    """Optimizer steps until ``run.total_steps``, resuming mid-epoch where the checkpoint left off."""
    _Loop(run).steps()


def micro_seed(seed: int, micro_batch: int, process: int) -> int:
    # Distinct for every (seed, process, micro-batch < 2**32); plain arithmetic, stable across Python versions.
    return ((seed * 1_000_003 + process) * 2**32 + micro_batch) % 2**63


class _Loop:
    """The loop over a run, with what only the loop tracks: the epoch and the log window.

    The window sums, since the last log, the loss, micro-batches, samples and tokens.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.epoch = 0
        self.window = torch.zeros(4, device=run.accelerator.device)
        self.window_started = time.perf_counter()

    def steps(self) -> None:
        run, recipe, accelerator, state = self.run, self.run.recipe, self.run.accelerator, self.run.state
        seed, ga, process = recipe.train.seed, recipe.train.grad_accum, accelerator.process_index
        self.epoch, done_in_epoch = divmod(state.step, run.steps_per_epoch)
        skip = done_in_epoch * ga  # batches of this epoch that the checkpoint already trained on
        micro = self.epoch * run.batches_per_epoch + skip
        run.bar = tqdm(
            total=run.total_steps,
            initial=state.step,
            desc="train",
            unit="step",
            disable=not accelerator.is_main_process,
            file=LineTrackingStream(sys.stderr),
        )
        run.ddp_model.train()
        with run.bar:
            while state.step < run.total_steps and not run.stopped_early:
                run.train_loader.set_epoch(self.epoch)
                batches = accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
                skip = 0
                for batch in batches:
                    torch.manual_seed(micro_seed(seed, micro, process))
                    micro += 1
                    self._micro_step(batch)
                    if not accelerator.sync_gradients:
                        continue
                    if not accelerator.optimizer_step_was_skipped:
                        run.scheduler.step()
                    state.step += 1
                    run.bar.update(1)
                    self._after_step()
                    if state.step >= run.total_steps or run.stopped_early:
                        break
                self.epoch += 1

    def _micro_step(self, batch: dict[str, torch.Tensor]) -> None:
        """Forward and backward one micro-batch; the optimizer steps on the last of each accumulation."""
        run = self.run
        accelerator, max_norm = run.accelerator, run.recipe.optim.max_grad_norm
        with accelerator.accumulate(run.ddp_model):
            loss = run.ddp_model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and max_norm:
                accelerator.clip_grad_norm_(run.params, max_norm)
            run.optimizer.step()
            run.optimizer.zero_grad()
        self.window[0] += loss.detach().float()
        self.window[1] += 1
        self.window[2] += len(batch["labels"])
        if "attention_mask" in batch:
            self.window[3] += batch["attention_mask"].sum()
        elif "position_ids" in batch:  # packed rows: every position holds a token (the little padding counts)
            self.window[3] += batch["input_ids"].numel()

    def _after_step(self) -> None:
        """The hooks that run after each optimizer step; whatever they write is checked finite first."""
        run = self.run
        recipe, step = run.recipe, run.state.step
        log = step % recipe.train.log_every == 0 or step == run.total_steps
        evaluate = recipe.eval.every and step % recipe.eval.every == 0 and step < run.total_steps
        checkpoint = recipe.checkpoint.every and step % recipe.checkpoint.every == 0
        if log or evaluate or checkpoint:
            self._check_finite()
        if log:
            self._log_train()
        if evaluate:
            evaluate_run(run, "during")
        if checkpoint:
            resume.save(run)

    def _check_finite(self) -> None:
        """Stop with ``TrainingDiverged`` if a loss since the last log, or a trainable parameter, is NaN or infinite.

        Runs before anything is logged, evaluated or saved (the last step always
        logs), so no checkpoint, log record or output holds a diverged adapter.
        """
        run = self.run
        # Each process checks its own slice of a sharded parameter; the sum below covers them all.
        flags = [~torch.isfinite(self.window[0])] + [~torch.isfinite(fsdp.local(p)).all() for p in run.params]
        diverged = run.accelerator.reduce(torch.stack(flags).any().float(), "sum").item()
        if diverged:
            latest = latest_checkpoint(run.run_dir)
            kept = f"the newest checkpoint, {latest}, is from before" if latest else "no checkpoint was written"
            first, last = run.checked_step + 1, run.state.step
            when = f"at step {last}" if first == last else f"between steps {first} and {last}"
            raise TrainingDiverged(
                f"training diverged: the loss or the adapter became NaN or infinite {when}; "
                f"the run stopped there and {kept}. "
                "Lower optim.lr, keep optim.max_grad_norm set, or use model.dtype bfloat16 or float32 "
                "rather than float16, and train again in a fresh output.dir"
            )
        run.checked_step = run.state.step

    def _log_train(self) -> None:
        """Write the mean loss and throughput since the last log, over all processes."""
        run = self.run
        loss_sum, micro_batches, samples, n_tokens = run.accelerator.reduce(self.window, "sum").tolist()
        elapsed = time.perf_counter() - self.window_started
        record = {
            "type": "train",
            "step": run.state.step,
            "epoch": self.epoch,
            "loss": loss_sum / micro_batches,
            "lr": run.scheduler.get_last_lr()[0],
            "samples_per_s": samples / elapsed,
        }
        if run.text:
            record["tokens_per_s"] = n_tokens / elapsed
        run.log.write(record)
        rate = f"{record['tokens_per_s']:.0f} tok/s" if run.text else f"{record['samples_per_s']:.1f} samples/s"
        run.bar.set_postfix_str(f"loss {record['loss']:.4f}, lr {record['lr']:.2e}, {rate}", refresh=True)
        self.window.zero_()
        self.window_started = time.perf_counter()
