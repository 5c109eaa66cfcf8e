"""Training of the per-frame VQ video tokenizer whose codes are a pre-training target, on DeepSpeed.

    python run_scripts/tokenizer.py --config run_scripts/configs/tokenizer/<recipe>.yaml
    torchrun --nproc_per_node 8 run_scripts/tokenizer.py --config ...      (also the deepspeed launcher, srun)

Every frame of the training clips is an image for the tokenizer (reconstruction MSE + commitment loss; the codebook
follows moving averages and restarts dead codes). Each epoch logs the reconstruction error, the share of the
codebook used and the codes' perplexity, warns when the codebook collapses, and draws frames over their
reconstructions (vis/). weights.pt holds the tokenizer with its codebook. Running the same command again resumes,
or reports that the run is done.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, installed or not

from engine.launch import launch  # noqa: E402
from engine.tasks.tokenizer import TokenizerTask  # noqa: E402

TASK = TokenizerTask


def main(argv=None) -> int:
    return launch(TASK, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
