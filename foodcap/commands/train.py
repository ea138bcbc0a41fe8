"""`foodcap train` / `python train.py`: train the ClipCap mapping network (and optionally GPT-2) on a feature store.

    python train.py --only_prefix --data ./RN50x4_RN_train.pkl --out_dir ./model_checkpoints \\
        --mapping_type transformer --num_layers 8 --prefix_length 40 --prefix_length_clip 40 --is_rn
    torchrun --nproc_per_node 4 train.py ...          # data-parallel (or `accelerate launch train.py ...` on GPUs)

Every flag of ClipCap's train.py and the food fork keeps its meaning. Writes <out_dir>/best/ (lowest validation
loss), <out_dir>/latest/ (with optimizer/scheduler/step/RNG state for --resume), <out_dir>/<prefix>-<epoch>/
every --save_every epochs, train_log.{jsonl,csv} and loss_curve.png. FOODCAP_GPT2=tiny makes `tiny` the
default --gpt2 (offline smoke runs of the seed's command).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from ..training import WARMUP_SHARE, TrainConfig, default_gpt2

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="foodcap train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ref = p.add_argument_group("ClipCap / food-fork flags")
    ref.add_argument("--data", default=TrainConfig.data, help="feature store from parse_food.py (.pkl or our format)")
    ref.add_argument("--out_dir", default=TrainConfig.out_dir, help="where checkpoints and logs go")
    ref.add_argument("--prefix", default=TrainConfig.prefix, help="name prefix of the per-epoch checkpoints <prefix>-<epoch>/")
    ref.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ref.add_argument("--save_every", type=int, default=TrainConfig.save_every,
                     help="write <prefix>-<epoch>/ at epochs 0, N, 2N, ... and the last (0: only best/ and latest/)")
    ref.add_argument("--prefix_length", type=int, default=None, help="prefix embeddings fed to GPT-2 (default 10, or the checkpoint's)")
    ref.add_argument("--prefix_length_clip", type=int, default=None,
                     help="transformer mapper: positions the CLIP vector is spread over (default 10, or the checkpoint's)")
    ref.add_argument("--bs", type=int, default=TrainConfig.bs,
                     help="GLOBAL batch size: each of P processes runs bs / (P x grad_accum) captions per micro-step")
    ref.add_argument("--only_prefix", action="store_true", help="train the mapper only; GPT-2 frozen (no gradients, no dropout)")
    ref.add_argument("--mapping_type", choices=("mlp", "transformer"), default=None, help="default mlp, or the checkpoint's")
    ref.add_argument("--num_layers", type=int, default=None, help="transformer mapper layers (default 8, or the checkpoint's)")
    ref.add_argument("--is_rn", action="store_true",
                     help="accepted for compatibility: the CLIP width is read from the data; contradicting it is an error")
    ref.add_argument("--normalize_prefix", action="store_true", default=None,
                     help="divide each CLIP embedding by its L2 norm (recorded in the checkpoint)")
    ref.add_argument("--weights_dir", "--init_from", dest="init_from", default=None,
                     help="start from a ClipCap .pt (or a folder holding one) or a foodcap checkpoint dir")
    opt = p.add_argument_group("training")
    opt.add_argument("--lr", type=float, default=TrainConfig.lr)
    opt.add_argument("--warmup_steps", type=int, default=TrainConfig.warmup_steps,
                     help=f"linear warm-up steps, capped at {WARMUP_SHARE * 100:.0f}%% of the run's optimizer steps")
    opt.add_argument("--gpt2", default=None, help=f"GPT-2 name, local dir or 'tiny' (default {default_gpt2()!r}, or the checkpoint's)")
    opt.add_argument("--val_data", default=None, help="validation store (default: the val/test split beside --data)")
    opt.add_argument("--no_val", action="store_true", help="no validation (best/ then follows the training loss)")
    opt.add_argument("--seed", type=int, default=TrainConfig.seed)
    opt.add_argument("--grad_accum", type=int, default=TrainConfig.grad_accum, help="micro-steps per optimizer step")
    opt.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=TrainConfig.mixed_precision,
                     help="autocast on GPU (bf16 also works on CPU)")
    opt.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    opt.add_argument("--num_workers", type=int, default=TrainConfig.num_workers, help="DataLoader workers")
    opt.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                     help="continue from <out_dir>/latest (or DIR): weights, optimizer, scheduler, step, RNG")
    opt.add_argument("--patience", type=int, default=TrainConfig.patience,
                     help="stop after N epochs without validation improvement (0: off)")
    opt.add_argument("--max_caption_tokens", type=int, default=None, help="truncate captions (default: ClipCap's mean + 10 std)")
    opt.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    opt.add_argument("--eval_every", type=int, default=0,
                     help="validation CIDEr (foodcap.evaluation) every N optimizer steps and at each epoch end (0: off)")
    opt.add_argument("--best_metric", default=None,
                     help="what selects best/: val_loss (default), or val_cider (default with --eval_every)")
    out = p.add_argument_group("logging and saving")
    out.add_argument("--report_to", choices=("none", "tensorboard", "wandb"), default=TrainConfig.report_to,
                     help="Accelerate tracker (stdout, train_log.jsonl/csv and loss_curve.png are always written)")
    out.add_argument("--log_every", type=int, default=TrainConfig.log_every, help="optimizer steps per log line")
    out.add_argument("--save_steps", type=int, default=TrainConfig.save_steps,
                     help="also refresh latest/ every N optimizer steps inside an epoch (0: epoch ends only)")
    out.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=args.data, out_dir=args.out_dir, prefix=args.prefix, epochs=args.epochs, save_every=args.save_every,
        prefix_length=args.prefix_length, clip_length=args.prefix_length_clip, bs=args.bs, only_prefix=args.only_prefix,
        mapping_type=args.mapping_type, num_layers=args.num_layers, is_rn=args.is_rn, normalize_prefix=args.normalize_prefix,
        init_from=args.init_from, lr=args.lr, warmup_steps=args.warmup_steps, gpt2=args.gpt2, val_data=args.val_data,
        no_val=args.no_val, seed=args.seed, grad_accum=args.grad_accum, mixed_precision=args.mixed_precision,
        max_steps=args.max_steps, num_workers=args.num_workers, resume=args.resume, patience=args.patience,
        report_to=args.report_to, log_every=args.log_every, save_steps=args.save_steps,
        max_caption_tokens=args.max_caption_tokens, cpu=args.cpu, eval_every=args.eval_every,
        best_metric=args.best_metric or ("val_cider" if args.eval_every else "val_loss"))


def callbacks_from_args(args: argparse.Namespace) -> list:
    if not args.eval_every:
        return []
    from ..evaluation import ValidationCider  # decodes the validation split and scores CIDEr

    return [ValidationCider()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..checkpoint import CheckpointError
    from ..train_data import TrainingDataError
    from ..training import TrainingDiverged, train
    from ..utils import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        best = train(config_from_args(args), callbacks=callbacks_from_args(args))
    except (TrainingDataError, CheckpointError, TrainingDiverged) as exc:
        print(f"foodcap train: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"foodcap train: error: {exc}", file=sys.stderr)
        return 1
    print(f"best checkpoint: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
