"""Masked video pre-training (VideoMAE / MAE-ST) on DeepSpeed.

    python run_scripts/pretrain.py --config run_scripts/configs/pretrain/<recipe>.yaml [key=value ...]
    torchrun --nproc_per_node 8 run_scripts/pretrain.py --config ...      (also the deepspeed launcher, srun)

Running the same command again resumes from the newest complete checkpoint, or reports that the run is done.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, installed or not

from engine.launch import launch  # noqa: E402
from engine.tasks.pretrain import PretrainTask  # noqa: E402

TASK = PretrainTask


def main(argv=None) -> int:
    return launch(TASK, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
