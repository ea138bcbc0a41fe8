"""The training loop on Hugging Face Accelerate: one process, or data-parallel under `accelerate launch` / torchrun.

    torchrun --nproc_per_node 2 train.py --data RN50x4_RN_train.pkl --bs 40   # same results as one process

Per optimizer step every process runs grad_accum micro-batches of its share of the global batch; the loss is the
sum of token cross-entropies divided by the global batch's token count (times the process count, which DDP's
gradient averaging divides out), so the update does not depend on how the batch was split.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .checkpoint import save_checkpoint
from .model import ClipCaptionModel
from .plots import RunLog
from .train_data import CaptionDataset, GlobalBatchSampler, eval_batches
from .train_state import STATE_NAME, restore_trainer_state, trainer_state_bytes
from .training import CaptionLoss, TrainingDiverged, effective_warmup, make_optimizer

log = logging.getLogger(__name__)


@dataclass
class TrainContext:
    """What callbacks see (on_step_end / on_evaluate / on_epoch_end); set should_stop to end training."""

    config: Any
    model: ClipCaptionModel  # unwrapped
    tokenizer: Any
    accelerator: Any
    data: Any  # training.PreparedData: stores, tokens, paths
    step: int = 0
    epoch: int = 0
    metrics: dict = field(default_factory=dict)
    should_stop: bool = False


class Trainer:
    def __init__(self, cfg, model: ClipCaptionModel, tokenizer, data, *, callbacks: Sequence[Any] = (),
                 resume_from: Optional[Path] = None):
        from accelerate import Accelerator

        self.cfg, self.tokenizer, self.data, self.callbacks = cfg, tokenizer, data, list(callbacks)
        self.out_dir = Path(cfg.out_dir)
        log_with = None if cfg.report_to in (None, "", "none") else cfg.report_to
        # Accelerate keeps its settings in process-wide singletons; a second train() in the same process (notebook,
        # demo, tests) may ask for another precision. The distributed set-up (PartialState) is kept.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        self.acc = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision, log_with=log_with,
                               project_dir=str(self.out_dir))
        acc = self.acc
        if cfg.mixed_precision == "fp16" and acc.device.type == "cpu":
            log.warning("--mixed_precision fp16 needs a GPU; training in float32 on the CPU (bf16 autocast works on CPUs)")
        self.model = model.to(acc.device)
        if acc.process_index:  # dropout masks differ between processes (the weights were seeded alike)
            torch.manual_seed(cfg.seed + 1_000_003 * acc.process_index)
        eos = tokenizer.eos_token_id
        self.train_set = CaptionDataset(data.train_store, data.train_tokens, data.max_tokens, filler_id=eos)
        self.val_set = (CaptionDataset(data.val_store, data.val_tokens, data.max_tokens, filler_id=eos)
                        if data.val_store is not None else None)
        self.sampler = GlobalBatchSampler(self.train_set.lengths, cfg.bs, num_processes=acc.num_processes,
                                          process_index=acc.process_index, grad_accum=cfg.grad_accum, seed=cfg.seed)
        self.total_steps = self.sampler.steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.warmup = effective_warmup(cfg.warmup_steps, self.total_steps)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, cfg.lr)
        # The scheduler stays outside accelerate.prepare, which would step it once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.loss_module, self.optimizer = acc.prepare(CaptionLoss(self.model), optimizer)
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.best: Optional[float] = None
        self.bad_epochs = 0
        self.improved = False  # best/ improved since the last epoch end (early stopping counts epochs without)
        self.runlog = RunLog(self.out_dir, enabled=acc.is_main_process)
        self._last_plot = time.monotonic()
        if resume_from is not None:
            restore_trainer_state(self, resume_from)
        self.ctx = TrainContext(cfg, self.model, tokenizer, acc, data)

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up then linear decay to 0 (ClipCap's get_linear_schedule_with_warmup)."""
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup))

    # ----------------------------------------------------------------------------------------- state
    def _config_bytes(self) -> bytes:
        import json

        return json.dumps(self.cfg.to_dict(), indent=2, default=str).encode()

    def save(self, name: str, *, with_state: bool = False) -> Optional[Path]:
        """Write <out_dir>/<name>/ atomically (model + config; plus optimizer/scheduler/step/RNG for resume)."""
        state = trainer_state_bytes(self) if with_state else None  # collective: every process takes part
        if not self.acc.is_main_process:
            return None
        extra = {"train_config.json": self._config_bytes()}
        if state is not None:
            extra[STATE_NAME] = state
        return save_checkpoint(self.model, self.out_dir / name, extra=extra)

    # ----------------------------------------------------------------------------------------- loop
    def _loader(self) -> torch.utils.data.DataLoader:
        # Its own generator: building an iterator must not draw from the global RNG that dropout uses.
        return torch.utils.data.DataLoader(self.train_set, sampler=self.sampler, batch_size=None,
                                           num_workers=self.cfg.num_workers, generator=torch.Generator(),
                                           pin_memory=self.acc.device.type == "cuda")

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.acc.device, non_blocking=True) for k, v in batch.items()}

    def _train_step(self, micro_batches: list[dict]) -> float:
        """One optimizer step over this process's micro-batches; returns the global batch's mean token loss."""
        acc = self.acc
        local_sum = torch.zeros((), device=acc.device)
        for i, batch in enumerate(micro_batches):
            batch = self._to_device(batch)
            sync = i == len(micro_batches) - 1
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            with acc.no_sync(self.loss_module) if not sync else contextlib.nullcontext():
                loss_sum, _ = self.loss_module(batch["tokens"], batch["prefix"], batch["labels"])
                # DDP averages gradients over processes; scaling by their count leaves sum / global tokens.
                loss = loss_sum * acc.num_processes / batch["global_tokens"].float()
                acc.backward(loss)
            local_sum += loss_sum.detach()
        total = acc.reduce(local_sum, reduction="sum") if acc.num_processes > 1 else local_sum
        mean = float(total) / float(micro_batches[0]["global_tokens"])
        if not math.isfinite(mean):
            raise TrainingDiverged(
                f"loss became {mean} at step {self.step + 1} (epoch {self.epoch + 1}); stopped without saving it. The last "
                f"good checkpoint is {self.out_dir / 'latest'}. Lower --lr, use --mixed_precision bf16 or no, or check the data; "
                "--resume continues from that checkpoint")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean

    @torch.no_grad()
    def validate(self) -> Optional[float]:
        if self.val_set is None:
            return None
        acc = self.acc
        per_process = max(1, math.ceil(self.cfg.bs / acc.num_processes))
        batches = eval_batches(len(self.val_set), per_process, num_processes=acc.num_processes, process_index=acc.process_index)
        totals = torch.zeros(2, device=acc.device, dtype=torch.float64)  # (loss sum, tokens)
        self.model.eval()
        try:
            loss_fn = CaptionLoss(self.model)
            for batch in batches:
                batch = self._to_device(self.val_set[batch])
                with acc.autocast():
                    loss_sum, n = loss_fn(batch["tokens"], batch["prefix"], batch["labels"])
                totals += torch.stack((loss_sum.double(), n.double()))
        finally:
            self.model.train()
        if acc.num_processes > 1:
            totals = acc.reduce(totals, reduction="sum")
        return float(totals[0] / totals[1])

    def _callbacks(self, hook: str, *, record: bool = True) -> dict:
        """Run `hook` on every callback; evaluation hooks see the model in eval mode (no dropout)."""
        metrics: dict = {}
        self.ctx.step, self.ctx.epoch = self.step, self.epoch
        evaluating = hook != "on_step_end"
        if evaluating:
            self.model.eval()
        try:
            for callback in self.callbacks:
                fn = getattr(callback, hook, None)
                if fn is not None:
                    metrics.update(fn(self.ctx) or {})
        finally:
            if evaluating:
                self.model.train()
        if metrics and record:
            self.runlog.write({"step": self.step, "epoch": self.epoch + 1, **metrics})
            self.acc.log(metrics, step=self.step)
        return metrics

    def _consider_best(self, metrics: dict) -> str:
        """Save best/ when the selection metric improved; returns the metric's name."""
        name = self.cfg.best_metric
        if name not in metrics:
            name = "val_loss" if metrics.get("val_loss") is not None else "epoch_train_loss"
        value = metrics.get(name)
        if value is None:
            return name
        lower_is_better = "loss" in name
        if self.best is None or (value < self.best if lower_is_better else value > self.best):
            self.best, self.improved = value, True
            self.save("best")
            log.info("step %d: %s %.4f, new best -> %s", self.step, name, value, self.out_dir / "best")
        return name

    def _evaluate(self) -> None:
        """--eval_every: callbacks' validation metrics mid-epoch; best/ may follow them."""
        metrics = self._callbacks("on_evaluate")
        if self.cfg.best_metric in metrics:
            self._consider_best(metrics)

    def _end_epoch(self, train_loss: Optional[float], *, complete: bool) -> None:
        """Validation, best/ by the chosen metric, latest/ with resume state, <prefix>-<epoch>/, early stopping.

        Also run when training stops mid-epoch (--max_steps, a callback): latest/ then resumes inside the epoch.
        """
        cfg, acc = self.cfg, self.acc
        metrics = {"epoch_train_loss": train_loss}
        val_loss = self.validate()
        if val_loss is not None:
            metrics["val_loss"] = val_loss
        metrics.update(self._callbacks("on_epoch_end", record=False))
        self.runlog.write({"step": self.step, "epoch": self.epoch + 1, **metrics})
        acc.log({k: v for k, v in metrics.items() if v is not None}, step=self.step)
        name = self._consider_best(metrics)
        self.bad_epochs = 0 if self.improved else self.bad_epochs + 1
        self.improved = False
        if self.bad_epochs:
            log.info("epoch %d: %s %s (best %s, %d epoch(s) without improvement)", self.epoch + 1, name,
                     metrics.get(name), self.best, self.bad_epochs)
        # ClipCap's rule: epochs 0, N, 2N, ... and the last one (0-based, as its <prefix>-<epoch:03d>.pt names were).
        if complete and cfg.save_every and (self.epoch % cfg.save_every == 0 or self.epoch == cfg.epochs - 1):
            self.save(f"{cfg.prefix}-{self.epoch:03d}")
        if cfg.patience and self.bad_epochs >= cfg.patience:
            log.info("early stopping: %s has not improved for %d epochs (--patience)", name, self.bad_epochs)
            self.ctx.should_stop = True
        if complete:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.save("latest", with_state=True)
        if acc.is_main_process:
            # The PNG costs ~0.5 s: redraw it at most once a minute during training (always at the end).
            plot = time.monotonic() - self._last_plot > 60
            self.runlog.export(plot=plot)
            self._last_plot = time.monotonic() if plot else self._last_plot

    def fit(self) -> Path:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        if acc.is_main_process:
            log.info("training %d captions, %d steps/epoch x %d epochs = %d steps (global batch %d = %d process(es) x "
                     "%d accumulation x ~%d), warm-up %d steps, lr %g, %s GPT-2", len(self.train_set),
                     self.sampler.steps_per_epoch, cfg.epochs, self.total_steps, cfg.bs, acc.num_processes, cfg.grad_accum,
                     cfg.bs // (acc.num_processes * cfg.grad_accum), self.warmup, cfg.lr,
                     "frozen" if self.model.config.only_prefix else "tuned")
        if cfg.report_to not in (None, "", "none"):
            acc.init_trackers("foodcap_train", config={k: v for k, v in cfg.to_dict().items()
                                                        if isinstance(v, (int, float, str, bool))})
        self.model.train()
        try:
            while self.epoch < cfg.epochs and self.step < self.total_steps and not self.ctx.should_stop:
                self._run_epoch(tqdm)
            acc.wait_for_everyone()
            if acc.is_main_process:
                self.runlog.export(plot=True)
        finally:
            acc.end_training()  # closes trackers (and, under torchrun, the process group)
        return self.out_dir / "best"

    def _run_epoch(self, tqdm) -> None:
        cfg, acc = self.cfg, self.acc
        self.sampler.set_epoch(self.epoch, self.step_in_epoch)
        loader = self._loader()
        bar = tqdm(total=self.sampler.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   disable=not acc.is_main_process, unit="step")
        window, epoch_losses, started, seen = [], [], time.perf_counter(), 0
        pending: list[dict] = []
        for batch in loader:
            pending.append(batch)
            if len(pending) < cfg.grad_accum:
                continue
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
            loss = self._train_step(pending)
            seen += sum(len(b["tokens"]) for b in pending) * acc.num_processes
            pending = []
            self.step += 1
            self.step_in_epoch += 1
            window.append(loss)
            epoch_losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.step % cfg.log_every == 0 or self.step_in_epoch == self.sampler.steps_per_epoch:
                record = {"step": self.step, "epoch": self.epoch + 1, "train_loss": sum(window) / len(window),
                          "lr": lr, "samples_per_s": seen / (time.perf_counter() - started)}
                self.runlog.write(record)
                acc.log({k: v for k, v in record.items() if k != "epoch"}, step=self.step)
                window = []
            epoch_done = self.step_in_epoch == self.sampler.steps_per_epoch or self.step >= self.total_steps
            if cfg.eval_every and self.step % cfg.eval_every == 0 and not epoch_done:
                self._evaluate()  # at an epoch's end on_epoch_end runs instead
            self._callbacks("on_step_end")
            if cfg.save_steps and self.step % cfg.save_steps == 0 and not epoch_done:
                self.save("latest", with_state=True)
            if epoch_done or self.ctx.should_stop:
                break
        bar.close()
        complete = self.step_in_epoch == self.sampler.steps_per_epoch
        self._end_epoch(sum(epoch_losses) / len(epoch_losses) if epoch_losses else None, complete=complete)
