"""Masked video pre-training (VideoMAE / MAE-ST) on DeepSpeed.

    python run_scripts/pretrain.py --config run_scripts/configs/pretrain/<recipe>.yaml [key=value ...]
    torchrun --nproc_per_node 8 run_scripts/pretrain.py --config ...      (also the deepspeed launcher, srun)

Running the same command again resumes from the newest complete checkpoint, or reports that the run is done.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, installed or not

from engine.config import config_from_cli  # noqa: E402
from engine.dist import cleanup, init_distributed, setup_logging  # noqa: E402
from engine.loop import TrainingStopped, train  # noqa: E402
from engine.preempt import install as install_preemption_handlers  # noqa: E402
from engine.pretrain import PretrainConfig, PretrainTask, derive_pretrain  # noqa: E402

log = logging.getLogger("pretrain")


def main(argv=None) -> int:
    cfg, _ = config_from_cli(PretrainConfig, argv)
    install_preemption_handlers(cfg.run.requeue_signal, cfg.run.stop_signal)  # before the slow set-up
    info = init_distributed()
    setup_logging(info.rank)
    try:
        task = PretrainTask(cfg)
        derived = derive_pretrain(cfg, info.world_size, num_train_samples=len(task.train_set))
        log.info("derived: %s", derived.as_dict())
        try:
            train(task, cfg, derived, info)
        except TrainingStopped as err:
            log.log(err.log_level, "%s", err)
            return err.exit_code
        if info.is_main:
            out = Path(cfg.run.output_dir)
            log.info("outputs in %s: config.yaml, derived.yaml, metrics.jsonl, tb/, vis/, checkpoints/, weights.pt, "
                     "loss_curve.png", out)
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
