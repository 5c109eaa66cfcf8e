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

from engine.eval.multiview import describe_scores  # noqa: E402
from engine.tasks.finetune import FinetuneTask, evaluate_weights, write_json  # noqa: E402
from engine.launch import add_eval_only_flags, eval_only_weights, launch  # noqa: E402

log = logging.getLogger("finetune")
TASK = FinetuneTask


def add_flags(parser) -> None:
    add_eval_only_flags(parser, "run the multi-view test of --weights; writes eval_<name>.json next to the weights",
                        "fine-tuned")


def eval_only(cfg, flags, info) -> int | None:
    weights = eval_only_weights(cfg, flags)
    if weights is None:
        return None
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
