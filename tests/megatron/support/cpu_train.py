"""TESTING ONLY: run ``nemodiff-train``'s orchestration with ``engine=megatron`` on CPU (gloo, world size 1).

Megatron-Bridge's real ``pretrain()`` loop, checkpointing, resume, signal handling and export, on a
machine without a GPU: imports go through :mod:`tests.megatron.support.shims` (no Transformer Engine /
modelopt / resiliency-ext) and CUDA calls through :mod:`tests.megatron.support.cpu_emulation`. Used by
``tests/megatron/test_megatron_cpu_pretrain.py`` in a subprocess (the torch patches must not leak into pytest).

    python -m tests.megatron.support.cpu_train recipe=tiny_cpu engine=megatron engine.device=cpu \
        run.dir=/tmp/run model.path=/tmp/tiny [--sigterm-at-step 3] [--summary out.json]

Prints one ``MEGATRON_CPU_RESULT {...}`` JSON line (also written to ``--summary``).

    python -m tests.megatron.support.cpu_train --export-cli checkpoint=<megatron run dir> out=<dir> remote_code=true

runs the real ``nemodiff-export`` CLI instead (same shims and emulation), for Megatron run directories.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("overrides", nargs="*")
    p.add_argument("--sigterm-at-step", type=int, default=None, help="send SIGTERM to self after this step")
    p.add_argument("--signal", default="SIGTERM", choices=["SIGTERM", "SIGUSR1"])
    p.add_argument("--summary", default=None)
    p.add_argument("--export-cli", action="store_true", help="run nemodiff-export with the overrides instead")
    p.add_argument("--torchrun", action="store_true",
                   help="keep torchrun's RANK/WORLD_SIZE (several processes, e.g. engine.cp=2) instead of world size 1")
    args = p.parse_args()

    import torch

    from . import cpu_emulation, import_megatron, single_process_env

    torch.set_num_threads(2)
    import_megatron()
    cpu_emulation.apply()
    if not args.torchrun:
        single_process_env()
    else:
        os.environ.setdefault("WANDB_MODE", "disabled")

    if args.export_cli:
        from nemodiff_train.cli.export import main as export_main

        sys.argv = ["nemodiff-export", *args.overrides]
        try:
            export_main()
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        print(f"MEGATRON_CPU_RESULT {json.dumps({'exit_code': code})}", flush=True)
        sys.stdout.flush()
        os._exit(code)

    from megatron.bridge.training.callbacks import Callback

    from nemodiff_train.config.load import compose
    from nemodiff_train.engines import TrainOptions
    from nemodiff_train.orchestrate import train

    rows: list[dict] = []

    class Recorder(Callback):
        def on_train_step_end(self, context):
            losses = {k: float(v) for k, v in (context.loss_dict or {}).items()}
            step = int(context.state.train_state.step)
            rows.append({"step": step, **losses})
            print(f"MEGATRON_CPU_STEP {json.dumps(rows[-1])}", flush=True)
            if args.sigterm_at_step is not None and step == args.sigterm_at_step:
                os.kill(os.getpid(), getattr(signal, args.signal))

    cfg = compose(args.overrides)
    t0 = time.time()
    result = {"overrides": args.overrides, "steps": rows}
    try:
        train(cfg, Path(cfg.run.dir), TrainOptions(callbacks=[Recorder()]))  # the engine, then the export
        result["exit"] = "returned"
    except SystemExit as e:  # Megatron-Bridge exits after a signal-triggered checkpoint
        result["exit"] = f"SystemExit({e.code})"
        result["exit_code"] = e.code
    result["wall_s"] = round(time.time() - t0, 1)
    line = json.dumps(result)
    print(f"MEGATRON_CPU_RESULT {line}", flush=True)
    if args.summary:
        Path(args.summary).write_text(line)
    code = result.get("exit_code", 0)
    import multiprocessing

    for child in multiprocessing.active_children():  # e.g. Megatron's checkpoint writer worker
        child.terminate()
    sys.stdout.flush()
    os._exit(int(code or 0))


if __name__ == "__main__":
    main()
