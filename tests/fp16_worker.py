"""`python -m bvpo.train` with fp16 on a CPU, as it runs on a GPU: a GradScaler and fp16 autocast.

accelerate builds a GradScaler for fp16 only on GPU-class devices; on a CPU it silently runs
fp32 (the trainer refuses that). This worker gives accelerate's Accelerator the CPU GradScaler
torch has (its arguments from BVPO_TEST_GRAD_SCALER, JSON) and runs the trainer's own `main`
unchanged, so loss scaling, overflow skips and unscaled telemetry go through the real code.
Run with ACCELERATE_MIXED_PRECISION=fp16 and the trainer's arguments.
"""

import json
import os
import sys

import accelerate
import torch


class CPUGradScalerAccelerator(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.state.mixed_precision == "fp16" and self.scaler is None:
            self.scaler = torch.amp.GradScaler("cpu", **json.loads(os.environ["BVPO_TEST_GRAD_SCALER"]))
            self.native_amp = True  # fp16 autocast, and unscale before clipping, as on a GPU


accelerate.Accelerator = CPUGradScalerAccelerator

if __name__ == "__main__":
    from bvpo import train

    sys.exit(train.main(sys.argv[1:]))
