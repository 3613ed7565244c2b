"""TWA on an existing candidate store or a folder of .pt / .safetensors checkpoints (no Ray needed).

    ray job submit --working-dir . -- python jobs/average.py --store /abs/ckpts --dataset mnist1d \
        --model mlp --mode v --bits 4 --out /abs/path/runs/avg

All flags of ``twa-ray average`` apply.
"""

import sys

from twa_ray.cli import main
from twa_ray.storage import job_argv

if __name__ == "__main__":
    sys.exit(main(job_argv("average", sys.argv[1:])))
