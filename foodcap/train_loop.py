"""The training loop on Hugging Face Accelerate: one process, or data-parallel under `accelerate launch` / torchrun.

    torchrun --nproc_per_node 2 train.py --data RN50x4_RN_train.pkl --bs 40   # same results as one process

Per optimizer step every process runs grad_accum micro-batches of its share of the global batch; the loss is the
sum of token cross-entropies divided by the global batch's token count (times the process count, which DDP's
gradient averaging divides out), so the update does not depend on how the batch was split.
"""
from __future__ import annotations

import io
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .checkpoint import save_checkpoint
from .model import ClipCaptionModel
from .plots import RunLog
from .train_data import CaptionDataset, GlobalBatchSampler, eval_batches
from .training import CaptionLoss, TrainingDiverged, effective_warmup

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"


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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, cfg, model: ClipCaptionModel, tokenizer, data, *, callbacks: Sequence[Any] = (),
                 resume_from: Optional[Path] = None):
        from accelerate import Accelerator

        self.cfg, self.tokenizer, self.data, self.callbacks = cfg, tokenizer, data, list(callbacks)
        self.out_dir = Path(cfg.out_dir)
        log_with = None if cfg.report_to in (None, "", "none") else cfg.report_to
        self.acc = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision, log_with=log_with,
                               project_dir=str(self.out_dir))
        acc = self.acc
        self.model = model.to(acc.device)
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
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # ClipCap: AdamW, no weight decay
        # The scheduler stays outside accelerate.prepare, which would step it once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.loss_module, self.optimizer = acc.prepare(CaptionLoss(self.model), optimizer)
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.best: Optional[float] = None
        self.bad_epochs = 0
        self.runlog = RunLog(self.out_dir, enabled=acc.is_main_process)
        self._last_plot = time.monotonic()
        if resume_from is not None:
            self._load_state(resume_from)
        self.ctx = TrainContext(cfg, self.model, tokenizer, acc, data)

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up then linear decay to 0 (ClipCap's get_linear_schedule_with_warmup)."""
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup))

    # ----------------------------------------------------------------------------------------- state
    def _state_bytes(self) -> bytes:
        from accelerate.utils import gather_object

        rng = gather_object([_rng_state()]) if self.acc.num_processes > 1 else [_rng_state()]
        state = {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "best": self.best,
                 "bad_epochs": self.bad_epochs, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": rng, "num_processes": self.acc.num_processes,
                 "data_key": self.data.train_tokens.key, "total_steps": self.total_steps,
                 "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def _config_bytes(self) -> bytes:
        import json

        return json.dumps(self.cfg.to_dict(), indent=2, default=str).encode()

    def save(self, name: str, *, with_state: bool = False) -> Optional[Path]:
        """Write <out_dir>/<name>/ atomically (model + config; plus optimizer/scheduler/step/RNG for resume)."""
        state = self._state_bytes() if with_state else None  # collective: every process takes part
        if not self.acc.is_main_process:
            return None
        extra = {"train_config.json": self._config_bytes()}
        if state is not None:
            extra[STATE_NAME] = state
        return save_checkpoint(self.model, self.out_dir / name, extra=extra)

    def _load_state(self, directory: Path) -> None:
        path = directory / STATE_NAME
        if not path.exists():
            log.warning("%s has weights but no %s: resuming weights only, with a fresh optimizer", directory, STATE_NAME)
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["data_key"] != self.data.train_tokens.key:
            raise ValueError(f"--resume: {directory} was trained on different data than {self.data.train_path} "
                             "(its captions changed); start a new --out_dir or pass the original --data")
        if state["total_steps"] != self.total_steps:
            log.warning("--resume: the run now has %d steps (was %d); the learning-rate schedule changes",
                        self.total_steps, state["total_steps"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
        if state["num_processes"] == self.acc.num_processes:
            _set_rng_state(state["rng"][self.acc.process_index])
        else:
            log.warning("--resume: saved with %d processes, now %d; dropout RNG restarts from the seed",
                        state["num_processes"], self.acc.num_processes)
            torch.manual_seed(self.cfg.seed + 7919 * self.step + self.acc.process_index)
        self.runlog.truncate_after(self.step)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", directory, self.step, self.epoch + 1, self.step_in_epoch)

    # ----------------------------------------------------------------------------------------- loop
    def _loader(self, batches) -> torch.utils.data.DataLoader:
        # Its own generator: building an iterator must not draw from the global RNG that dropout uses.
        return torch.utils.data.DataLoader(self.train_set if isinstance(batches, GlobalBatchSampler) else self.val_set,
                                           sampler=batches, batch_size=None, num_workers=self.cfg.num_workers,
                                           generator=torch.Generator(), pin_memory=self.acc.device.type == "cuda")

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.acc.device, non_blocking=True) for k, v in batch.items()}

    def _train_step(self, micro_batches: list[dict]) -> float:
        """One optimizer step over this process's micro-batches; returns the global batch's mean token loss."""
        acc = self.acc
        local_sum = torch.zeros((), device=acc.device)
        for i, batch in enumerate(micro_batches):
            batch = self._to_device(batch)
            sync = i == len(micro_batches) - 1
            ctx = acc.no_sync(self.loss_module) if not sync else _nullcontext()
            with ctx:
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

    def _callbacks(self, hook: str) -> dict:
        metrics: dict = {}
        self.ctx.step, self.ctx.epoch = self.step, self.epoch
        for callback in self.callbacks:
            fn = getattr(callback, hook, None)
            if fn is not None:
                metrics.update(fn(self.ctx) or {})
        if metrics:
            self.runlog.write({"step": self.step, "epoch": self.epoch + 1, **metrics})
            self.acc.log(metrics, step=self.step)
        return metrics

    def _is_better(self, value: float) -> bool:
        lower_is_better = "loss" in self.cfg.best_metric
        return self.best is None or (value < self.best if lower_is_better else value > self.best)

    def _end_epoch(self, train_loss: Optional[float], *, complete: bool) -> None:
        """Validation, best/ by the chosen metric, latest/ with resume state, <prefix>-<epoch>/, early stopping.

        Also run when training stops mid-epoch (--max_steps, a callback): latest/ then resumes inside the epoch.
        """
        cfg, acc = self.cfg, self.acc
        metrics = {"epoch_train_loss": train_loss}
        val_loss = self.validate()
        if val_loss is not None:
            metrics["val_loss"] = val_loss
        metrics.update(self._callbacks("on_epoch_end"))
        self.runlog.write({"step": self.step, "epoch": self.epoch + 1, **metrics})
        acc.log({k: v for k, v in metrics.items() if v is not None}, step=self.step)
        metric_name = cfg.best_metric if cfg.best_metric in metrics else ("val_loss" if val_loss is not None else "epoch_train_loss")
        value = metrics.get(metric_name)
        improved = value is not None and self._is_better(value)
        if improved:
            self.best, self.bad_epochs = value, 0
            self.save("best")
            log.info("epoch %d: %s %.4f, new best -> %s", self.epoch + 1, metric_name, value, self.out_dir / "best")
        else:
            self.bad_epochs += 1
            log.info("epoch %d: %s %s (best %.4f, %d epoch(s) without improvement)", self.epoch + 1, metric_name,
                     "n/a" if value is None else f"{value:.4f}", self.best or float("nan"), self.bad_epochs)
        if complete and cfg.save_every and (self.epoch + 1) % cfg.save_every == 0:
            self.save(f"{cfg.prefix}-{self.epoch:03d}")
        if cfg.patience and self.bad_epochs >= cfg.patience:
            log.info("early stopping: %s has not improved for %d epochs (--patience)", metric_name, self.bad_epochs)
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
        loader = self._loader(self.sampler)
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
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self._callbacks("on_evaluate")
            self._callbacks("on_step_end")
            if cfg.save_steps and self.step % cfg.save_steps == 0 and not epoch_done:
                self.save("latest", with_state=True)
            if epoch_done or self.ctx.should_stop:
                break
        bar.close()
        complete = self.step_in_epoch == self.sampler.steps_per_epoch
        self._end_epoch(sum(epoch_losses) / len(epoch_losses) if epoch_losses else None, complete=complete)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
