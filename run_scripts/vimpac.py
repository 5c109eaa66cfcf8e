"""VIMPAC pre-training on DeepSpeed: block-masked prediction of a frozen tokenizer's codes, plus InfoNCE between two
clips of each video.

    python run_scripts/tokenizer.py --config run_scripts/configs/tokenizer/<recipe>.yaml     (once: the tokenizer)
    python run_scripts/vimpac.py --config run_scripts/configs/vimpac/<recipe>.yaml model.tokenizer=<its weights.pt>
    torchrun --nproc_per_node 8 run_scripts/vimpac.py --config ...      (also the deepspeed launcher, srun)

contrastive.weight=0 trains mask-then-predict alone. The encoder in weights.pt fine-tunes with run_scripts/finetune.py
(model.tokenizer set to the same tokenizer) and is probed with run_scripts/probe.py. Running the same command again
resumes from the newest complete checkpoint, or reports that the run is done.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, installed or not

from engine.launch import launch  # noqa: E402
from engine.tasks.vimpac import VimpacTask  # noqa: E402

TASK = VimpacTask


def main(argv=None) -> int:
    return launch(TASK, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
