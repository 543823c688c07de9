"""The one training loop: every method (full / lora / qlora), both model kinds, one or many processes.

Step t (one optimizer update) over `grad_accum` micro-batches b, on every process p:
    loss_t = Σ_{p,b} NLL(answer tokens of b) / N_t,   N_t = Σ_{p,b} answer tokens   (nats / token)
Each process back-propagates Σ_b NLL_b · P / N_t, and DDP averages gradients over the P processes, so
the gradient is exactly that of loss_t however the tokens fall across micro-batches and processes.
Then: gradient-norm clipping, AdamW, and the learning rate
    lr(t) = lr · t / warmup                                        for t < warmup
    lr(t) = lr · (m + (1 − m) · ½(1 + cos(π · (t − warmup) / (T − warmup))))   after (m = min_lr_ratio)
Validation (answer_loss, summed over processes) runs before the first step, every `eval_every` steps
and at the end; keep-best restores the best one, early stopping ends after `patience` evals without
improvement. The budget is max_steps (or epochs) and max_minutes, whichever ends first.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from medmerge.config import TrainConfig
from medmerge.data import pad_batch
from medmerge.loss import answer_loss, batch_nll
from medmerge.train.batching import BatchStream, eval_batches
from medmerge.train.examples import Example, answer_tokens, example_tokens
from medmerge.train.precision import Runtime, all_sum, autocast_context


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate at `step` (0-based count of updates done; see module doc)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over all tensors; CPU and CUDA) where torch has it.

    Same update rule as the per-tensor loop (decoupled weight decay, bias-corrected moments); it only
    saves the per-tensor dispatch, which dominates for the hundreds of small LoRA matrices.
    """
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@dataclass
class LoopState:
    """What the loop carries between steps (and through checkpoints)."""

    step: int = 0
    tokens: int = 0  # non-padding tokens processed, all processes
    elapsed_s: float = 0.0
    best_val: float = math.inf
    best_step: int = 0
    evals_without_gain: int = 0
    initial_val: float | None = None
    last_val: float | None = None
    stopped_because: str = ""
    curve: list[dict[str, Any]] = field(default_factory=list)
    privacy: dict[str, Any] | None = None  # DP accountant history / record (medmerge.train.privacy)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class StopFlag:
    """Set by the first Ctrl-C (SIGINT): the loop finishes its step, checkpoints, and stops."""

    def __init__(self) -> None:
        self.set = False
        self._old: Any = None

    def __enter__(self) -> StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no handler, Ctrl-C raises as usual
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.set = True
        signal.signal(signal.SIGINT, self._old or signal.default_int_handler)  # a second Ctrl-C aborts

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class Trainer:
    """Runs the loop on an already built model; each of `hooks` gets (trainer, step) after each step."""

    def __init__(
        self,
        config: TrainConfig,
        model: torch.nn.Module,
        kind: str,
        train: list[Example],
        validation: list[Example],
        pad_id: int,
        runtime: Runtime,
        bf16: bool,
    ) -> None:
        self.config, self.kind, self.runtime, self.bf16 = config, kind, runtime, bf16
        self.model = model  # the unwrapped model: what is saved and evaluated
        self.train, self.validation, self.pad_id = train, validation, pad_id
        self.forward_model: Any = model
        if runtime.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.forward_model = DistributedDataParallel(model)
            self.forward_model.config = model.config  # batch_nll reads config.is_encoder_decoder
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_adamw(params, config.learning_rate, config.weight_decay)
        self.stream = BatchStream(
            [len(e["input_ids"]) + len(e["labels"]) for e in train],
            config.batch_size,
            config.seed,
            group_by_length=config.group_by_length,
            rank=runtime.rank,
            world=runtime.world,
        )
        epoch_steps = max(1, self.stream.batches_per_epoch // config.grad_accum)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * epoch_steps))
        # The schedule reads total_steps (a subclass may change it) through a weak reference: a strong
        # one (trainer → scheduler → lambda → trainer) is a reference cycle that keeps the model and the
        # optimizer state alive after the training until Python's next full collection, so that
        # trainings in one process would add up instead of following each other.
        trainer = weakref.ref(self)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, config.warmup_steps, trainer().total_steps, config.min_lr_ratio),
        )
        self.state = LoopState()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.hooks: list[Any] = []

    # ------------------------------------------------------------------------------ evaluation

    def validate(self) -> float:
        """Mean answer NLL of the validation set (nats / token), summed over all processes."""
        lengths = [len(e["input_ids"]) + len(e["labels"]) for e in self.validation]
        batches = (
            pad_batch([self.validation[i] for i in idx], self.pad_id)
            for idx in eval_batches(lengths, self.config.batch_size, self.runtime.rank, self.runtime.world)
        )
        with autocast_context(self.bf16, self.runtime.device):
            result = answer_loss(self.model, batches)
        nll, tokens = all_sum(self.runtime, result.nll_sum, result.tokens)
        return nll / max(tokens, 1)

    def _record_eval(self, val: float) -> None:
        state = self.state
        state.last_val = val
        if state.initial_val is None:
            state.initial_val = val
        if val < state.best_val:
            state.best_val, state.best_step, state.evals_without_gain = val, state.step, 0
            if self.config.keep_best:
                self.best_state = {
                    n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
                }
        else:
            state.evals_without_gain += 1

    # ---------------------------------------------------------------------------------- a step

    def step(self) -> tuple[float, int]:
        """One optimizer update: (train loss, nats / answer token; non-pad tokens), over all processes."""
        micro = [[self.train[i] for i in next(self.stream)] for _ in range(self.config.grad_accum)]
        local_answer = sum(answer_tokens(e, self.kind) for b in micro for e in b)
        local_tokens = sum(example_tokens(e, self.kind) for b in micro for e in b)
        (n_answer,) = all_sum(self.runtime, local_answer)
        scale = self.runtime.world / max(n_answer, 1)
        nll_total = 0.0
        for i, examples in enumerate(micro):
            batch = {k: v.to(self.runtime.device) for k, v in pad_batch(examples, self.pad_id).items()}
            last = i == len(micro) - 1
            sync = (
                contextlib.nullcontext()
                if last or not self.runtime.distributed
                else self.forward_model.no_sync()
            )
            with sync:
                with autocast_context(self.bf16, self.runtime.device):
                    nll, _ = batch_nll(self.forward_model, batch)
                (nll * scale).backward()
            nll_total += float(nll.detach())
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        nll_sum, tokens = all_sum(self.runtime, nll_total, local_tokens)
        return nll_sum / max(n_answer, 1), int(tokens)

    # ------------------------------------------------------------------------------ the loop

    def run(self, save_checkpoint: Any, progress: bool = True) -> LoopState:
        """Train until the budget ends; `save_checkpoint(trainer)` is called every checkpoint_every steps,
        and on Ctrl-C (after which KeyboardInterrupt is raised)."""
        config, state = self.config, self.state
        if state.step == 0 and state.initial_val is None:
            self._record_eval(self.validate())
            state.curve.append({"step": 0, "epoch": 0, "lr": 0.0, "val_loss": state.last_val, "tokens": 0})
        if state.step == 0:
            for hook in self.hooks:
                hook(self, 0)
        started = time.monotonic() - state.elapsed_s
        bar = tqdm(
            total=self.total_steps,
            initial=state.step,
            disable=not (progress and self.runtime.main),
            desc=f"train {config.method}",
            unit="step",
            dynamic_ncols=True,
        )
        last_eval_step = state.step
        with StopFlag() as interrupt, bar:
            while not state.stopped_because:
                if state.step >= self.total_steps:
                    state.stopped_because = "max_steps" if config.max_steps else "epochs"
                    break
                loss, tokens = self.step()
                state.step += 1
                state.tokens += tokens
                state.elapsed_s = time.monotonic() - started
                row = {
                    "step": state.step,
                    "epoch": round(
                        self.stream.epoch + self.stream.index / max(1, self.stream.batches_per_epoch), 4
                    ),
                    "lr": self.scheduler.get_last_lr()[0],
                    "train_loss": loss,
                    "tokens": state.tokens,
                    "elapsed_s": round(state.elapsed_s, 3),
                }
                if config.eval_every and state.step % config.eval_every == 0:
                    self._record_eval(self.validate())
                    row["val_loss"], last_eval_step = state.last_val, state.step
                    if (
                        config.early_stopping_patience is not None
                        and state.evals_without_gain >= config.early_stopping_patience
                    ):
                        state.stopped_because = "early_stopping"
                state.curve.append(row)
                if config.max_minutes is not None and state.elapsed_s >= 60 * config.max_minutes:
                    state.stopped_because = state.stopped_because or "max_minutes"
                for hook in self.hooks:
                    hook(self, state.step)
                # every process must agree to stop (Ctrl-C or the clock may reach only some of them)
                stop_votes = all_sum(
                    self.runtime, float(interrupt.set), float(state.stopped_because == "max_minutes")
                )
                if stop_votes[1] and not state.stopped_because:
                    state.stopped_because = "max_minutes"
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss:.3f}",
                    val=f"{state.last_val:.3f}",
                    tok_s=f"{state.tokens / max(state.elapsed_s, 1e-9):.0f}",
                )
                if stop_votes[0]:
                    save_checkpoint(self)
                    raise KeyboardInterrupt(f"interrupted at step {state.step}; checkpoint saved")
                if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                    save_checkpoint(self)
        if last_eval_step != state.step:
            self._record_eval(self.validate())
            state.curve[-1]["val_loss"] = state.last_val
        if config.keep_best and self.best_state is not None and state.best_step != state.step:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in self.best_state.items():
                    params[name].copy_(value)
        return state
