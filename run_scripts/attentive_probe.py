"""Attentive probing (V-JEPA's protocol) of a frozen video ViT encoder, on DeepSpeed.

    python run_scripts/attentive_probe.py --config run_scripts/configs/attentive_probe/<recipe>.yaml \
        model.init=<weights>
    torchrun --nproc_per_node 8 run_scripts/attentive_probe.py --config ...      (also the deepspeed launcher, srun)

``model.init`` takes anything fine-tuning reads; empty probes the encoder at random initialisation. Every step runs
the frozen encoder once without gradients and trains one attentive probe (a learned query cross-attending to every
token, an MLP, a linear classifier) per learning rate of grid.lrs on its tokens. The run validates every probe
every eval.every_epochs, and at the end scores them on validation and the multi-view test and reports the one chosen
on validation: probe_results.md / .json, best_probe.pt. Running the same command again resumes, or reports that the
run is done.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, installed or not

from engine.tasks.attentive_probe import AttentiveProbeTask  # noqa: E402
from engine.launch import launch  # noqa: E402

TASK = AttentiveProbeTask


def main(argv=None) -> int:
    return launch(TASK, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
