"""AVA spatio-temporal action detection (a ViT encoder with an RoI head) on DeepSpeed.

    python run_scripts/detect.py --config run_scripts/configs/detect/<recipe>.yaml model.init=<weights>
    torchrun --nproc_per_node 8 run_scripts/detect.py --config ...      (also the deepspeed launcher, srun)
    python run_scripts/detect.py --config ... --eval-only [--weights <detector weights>]

``model.init`` takes anything fine-tuning reads (our pre-training export, a fine-tuned classifier, official
VideoMAE / V2 or Hugging Face checkpoints) for the encoder; the head starts fresh. The run trains on the
ground-truth boxes, reports frame mAP on the detected validation boxes every ``eval.every_epochs`` (best weights
in best.pt), and tests the last weights at the end (test_results.json, detections.csv). Running the same command
again resumes, or reports that the run is done.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, installed or not

from engine.eval.detection import describe, write_outputs  # noqa: E402
from engine.tasks.detection import DetectionTask, evaluate_weights  # noqa: E402
from engine.launch import add_eval_only_flags, eval_only_weights, launch  # noqa: E402

log = logging.getLogger("detect")
TASK = DetectionTask


def add_flags(parser) -> None:
    add_eval_only_flags(parser, "score the validation keyframes with --weights; writes eval_<name>.json and "
                                "eval_<name>_detections.csv next to the weights", "detector")


def eval_only(cfg, flags, info) -> int | None:
    weights = eval_only_weights(cfg, flags)
    if weights is None:
        return None
    result, ap, label_map = evaluate_weights(cfg, str(weights), info.device)
    if info.is_main:
        log.info("%s", describe(f"test of {weights}", result, ap, label_map))
        write_outputs(weights.parent, f"eval_{weights.stem}", f"eval_{weights.stem}_detections.csv", result, ap,
                      label_map, weights=str(weights))
    return 0


def main(argv=None) -> int:
    return launch(TASK, argv, doc=__doc__, add_flags=add_flags, instead_of_training=eval_only)


if __name__ == "__main__":
    sys.exit(main())
