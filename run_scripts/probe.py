"""Linear probing and k-NN of a frozen video ViT encoder, on features cached once, on DeepSpeed.

    python run_scripts/probe.py --config run_scripts/configs/probe/<recipe>.yaml model.init=<weights>
    torchrun --nproc_per_node 8 run_scripts/probe.py --config ...      (also the deepspeed launcher, srun)

``model.init`` takes anything fine-tuning reads (our weights.pt or a checkpoint step directory, official VideoMAE /
V2 or Hugging Face checkpoints); empty probes the encoder at random initialisation. The run extracts the encoder's
pooled features into <run>/features (resumable, split over the ranks), trains every head of the grid (pooled
feature x lr x weight decay) in one pass over them, scores each head and k-NN setting on validation and on the
multi-view test, and reports the ones chosen on validation: probe_results.md / .json, best_head.pt. Running the
same command again resumes (extraction or training), or reports that the run is done.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, installed or not

from engine.launch import launch  # noqa: E402
from engine.tasks.probe import LinearProbeTask  # noqa: E402

TASK = LinearProbeTask


def main(argv=None) -> int:
    return launch(TASK, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
