"""Fine-tuning and testing of a video ViT classifier on DeepSpeed.

    python run_scripts/finetune.py --config run_scripts/configs/finetune/<recipe>.yaml model.init=<weights>
    torchrun --nproc_per_node 8 run_scripts/finetune.py --config ...      (also the deepspeed launcher, srun)
    python run_scripts/finetune.py --config ... --eval-only [--weights <fine-tuned weights>]

``model.init`` takes our pre-training export (weights.pt), a fine-tuned checkpoint, an official VideoMAE / V2
release or a Hugging Face VideoMAE checkpoint; without it the model trains from scratch. The run validates
every ``eval.every_epochs`` (best weights in best.pt), and tests the last weights on the multi-view test set
(test_results.json). Running the same command again resumes, or reports that the run is done.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, installed or not

from engine.config import ConfigError  # noqa: E402
from engine.finetune import EXPORTS, FinetuneTask, describe_scores, evaluate_weights, write_json  # noqa: E402
from engine.launch import launch  # noqa: E402

log = logging.getLogger("finetune")
TASK = FinetuneTask


def add_flags(parser) -> None:
    parser.add_argument("--eval-only", action="store_true",
                        help="run the multi-view test of --weights instead of training; writes eval_<name>.json "
                             "next to the weights")
    parser.add_argument("--weights", metavar="PATH",
                        help="fine-tuned weights for --eval-only (default: the run's weights.pt)")


def eval_only(cfg, flags, info) -> int | None:
    if not flags.eval_only:
        if flags.weights:
            raise ConfigError("--weights is for --eval-only; to start training from weights, set model.init=PATH")
        return None
    weights = Path(flags.weights or Path(cfg.run.output_dir) / EXPORTS["model"][0])
    summary = evaluate_weights(cfg, str(weights), info.device)
    if info.is_main:
        views = f"{cfg.data.test_temporal_views}x{cfg.data.eval_augment.num_spatial_views} views"
        log.info("%s", describe_scores(f"test of {weights}, {views}", summary))
        out = weights.parent / f"eval_{weights.stem}.json"
        write_json(out, {"weights": str(weights), "views": views, "model": summary})
        log.info("wrote %s", out)
    return 0


def main(argv=None) -> int:
    return launch(TASK, argv, doc=__doc__, add_flags=add_flags, instead_of_training=eval_only)


if __name__ == "__main__":
    sys.exit(main())
