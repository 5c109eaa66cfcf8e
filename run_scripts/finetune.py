"""Fine-tuning and testing of a video ViT classifier on DeepSpeed.

    python run_scripts/finetune.py --config run_scripts/configs/finetune/<recipe>.yaml model.init=<weights>
    torchrun --nproc_per_node 8 run_scripts/finetune.py --config ...      (also the deepspeed launcher, srun)
    python run_scripts/finetune.py --config ... --eval-only [--weights=<fine-tuned weights>]

``model.init`` takes our pre-training export (weights.pt), a fine-tuned checkpoint, an official VideoMAE / V2
release or a Hugging Face VideoMAE checkpoint; without it the model trains from scratch. The run validates
every ``eval.every_epochs`` (best weights in best.pt), and tests the last weights on the multi-view test set
(test_results.json). Running the same command again resumes, or reports that the run is done.
``--eval-only`` tests ``--weights`` (default: the run's weights.pt) and writes eval_<name>.json.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, installed or not

from engine.config import config_from_cli  # noqa: E402
from engine.dist import cleanup, init_distributed, setup_logging  # noqa: E402
from engine.finetune import (  # noqa: E402
    EXPORTS,
    FinetuneConfig,
    FinetuneTask,
    describe_scores,
    evaluate_weights,
    write_json,
)
from engine.loop import TrainingStopped, train  # noqa: E402
from engine.preempt import install as install_preemption_handlers  # noqa: E402

log = logging.getLogger("finetune")


def eval_only(cfg: FinetuneConfig, weights: str, info) -> int:
    summary = evaluate_weights(cfg, weights, info.device)
    if info.is_main:
        views = f"{cfg.data.test_temporal_views}x{cfg.data.eval_augment.num_spatial_views} views"
        log.info("%s", describe_scores(f"test of {weights}, {views}", summary))
        out = Path(cfg.run.output_dir) / f"eval_{Path(weights).stem}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, {"weights": weights, "views": views, "model": summary})
        log.info("wrote %s", out)
    return 0


def main(argv=None) -> int:
    cfg, flags = config_from_cli(FinetuneConfig, argv)
    if not flags.get("eval_only"):
        install_preemption_handlers(cfg.run.requeue_signal, cfg.run.stop_signal)  # before the slow set-up
    info = init_distributed()
    setup_logging(info.rank)
    try:
        if flags.get("eval_only"):
            weights = flags.get("weights")
            if weights is True or not weights:
                weights = str(Path(cfg.run.output_dir) / EXPORTS["model"][0])
            return eval_only(cfg, weights, info)
        task = FinetuneTask(cfg, info.world_size)
        log.info("derived: %s", task.derived.as_dict())
        try:
            train(task, cfg, task.derived, info)
        except TrainingStopped as err:
            log.log(err.log_level, "%s", err)
            return err.exit_code
        if info.is_main:
            log.info("outputs in %s: config.yaml, derived.yaml, metrics.jsonl, tb/, checkpoints/, weights.pt, "
                     "best.pt, test_results.json", cfg.run.output_dir)
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
