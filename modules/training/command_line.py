"""What the training commands share on the command line (`mod-adapter pretrain`, `train`, `world train-*`): the
optimisation and output options, the loop configuration they make, and how a run's end is reported."""

from __future__ import annotations

import argparse
import sys

EXIT_INTERRUPTED = 130  # the shell's convention for a run ended by Ctrl-C


def add_loop_arguments(p: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps}, the paper's)")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"global samples per optimizer step, over all processes and accumulation (default {batch_size})")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches accumulated per step; batch-size must be divisible by grad-accum × processes")
    g.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate (default {lr:g})")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon (default 1e-8)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    g.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default="constant",
                   help="learning rate after warm-up (default constant)")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="floor of the cosine/linear decay, × lr")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default 1.0; 0 = off)")
    g.add_argument("--ema-decay", type=float, default=0.0,
                   help="keep an EMA of the adapter weights with this decay, e.g. 0.9999 (default 0 = off); "
                        "saved as adapter-ema.safetensors")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and noise (default 0)")
    g.add_argument("--mixed-precision", choices=["auto", "no", "bf16"], default="auto",
                   help="autocast for the adapter (default auto: bf16 on CUDA, none on the CPU)")
    g.add_argument("--device", default="auto",
                   help="auto (this process's GPU under torchrun, else cuda when available, else cpu), cpu, cuda, cuda:N")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: checkpoint-<step>/, adapter.safetensors, losses.csv, losses.png")
    o.add_argument("--save-every", type=int, default=1000, help="checkpoint every K steps (default 1000)")
    o.add_argument("--keep-checkpoints", type=int, default=3, help="keep the newest N checkpoints (default 3; 0 = all)")
    o.add_argument("--resume", metavar="DIR",
                   help="continue from a checkpoint folder, or from the newest checkpoint of an output folder")
    o.add_argument("--stop-after-step", type=int,
                   help="save a checkpoint and stop after this step (as a preempted job; resume later)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def loop_config(args: argparse.Namespace):
    from .loop import LoopConfig

    return LoopConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
        warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule, min_lr_ratio=args.min_lr_ratio,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None, ema_decay=args.ema_decay,
        seed=args.seed, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        validate_every=getattr(args, "validate_every", 0), stop_after_step=args.stop_after_step,
        mixed_precision=args.mixed_precision, progress=not args.no_progress)


def finish_training(result, what: str = "adapter") -> int:
    if not result.stopped_early:
        print(f"trained {result.steps_done} steps; {what}: {result.final_adapter}", file=sys.stderr)
        return 0
    print(f"stopped after step {result.steps_done}; continue with --resume {result.out_dir}", file=sys.stderr)
    return EXIT_INTERRUPTED
