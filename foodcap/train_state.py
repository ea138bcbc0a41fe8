"""What --resume restores besides the weights: optimizer, scheduler, AMP scaler, step/epoch position, best metric,
early-stopping counters and every process's RNG state, in <out_dir>/latest/trainer_state.pt.

    python -c "import torch; print(torch.load('model_checkpoints/latest/trainer_state.pt', weights_only=True)['step'])"

Only tensors and plain containers are stored, so it loads with torch.load(weights_only=True).
"""
from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import torch

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainer_state_bytes(trainer) -> bytes:
    """Everything --resume needs besides the weights (RNG of every process, gathered: a collective call)."""
    from accelerate.utils import gather_object

    rng = gather_object([rng_state()]) if trainer.acc.num_processes > 1 else [rng_state()]
    state = {"step": trainer.step, "epoch": trainer.epoch, "step_in_epoch": trainer.step_in_epoch, "best": trainer.best,
             "bad_epochs": trainer.bad_epochs, "improved": trainer.improved, "optimizer": trainer.optimizer.state_dict(),
             "scheduler": trainer.scheduler.state_dict(), "rng": rng, "num_processes": trainer.acc.num_processes,
             "data_key": trainer.data.train_tokens.key, "total_steps": trainer.total_steps,
             "scaler": trainer.acc.scaler.state_dict() if trainer.acc.scaler is not None else None}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def restore_trainer_state(trainer, directory: Path) -> None:
    """Optimizer, scheduler, scaler, position in the run, early-stopping state and RNG from `directory`."""
    path = directory / STATE_NAME
    if not path.exists():
        log.warning("%s has weights but no %s: resuming weights only, with a fresh optimizer", directory, STATE_NAME)
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["data_key"] != trainer.data.train_tokens.key:
        raise ValueError(f"--resume: {directory} was trained on different data than {trainer.data.train_path} "
                         "(its captions changed); start a new --out_dir or pass the original --data")
    if state["total_steps"] != trainer.total_steps:
        log.warning("--resume: the run now has %d steps (was %d); the learning-rate schedule changes",
                    trainer.total_steps, state["total_steps"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") is not None and trainer.acc.scaler is not None:
        trainer.acc.scaler.load_state_dict(state["scaler"])
    trainer.step, trainer.epoch, trainer.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
    trainer.best, trainer.bad_epochs, trainer.improved = state["best"], state["bad_epochs"], state["improved"]
    if state["num_processes"] == trainer.acc.num_processes:
        set_rng_state(state["rng"][trainer.acc.process_index])
    else:
        log.warning("--resume: saved with %d processes, now %d; dropout RNG restarts from the seed",
                    state["num_processes"], trainer.acc.num_processes)
        torch.manual_seed(trainer.cfg.seed + 7919 * trainer.step + trainer.acc.process_index)
    trainer.runlog.truncate_after(trainer.step)
    log.info("resumed from %s at step %d (epoch %d, batch %d)", directory, trainer.step, trainer.epoch + 1, trainer.step_in_epoch)
