"""The sweep job: Ray Tune over TWA's knobs, one sampling run per group of trials.

    ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweep_mnist1d.yaml \
        --out /abs/path/runs/sweep --max-concurrent 8
    python jobs/sweep.py --config configs/sweep_mnist1d.yaml --smoke-test --out runs/sweep_smoke

Inside ``ray job submit`` ``ray.init()`` joins the cluster; without one it starts a local Ray
(with the dashboard, as ``ray[default]`` is installed). All flags of ``twa-ray sweep`` apply.
"""

import sys

from twa_ray.cli import main
from twa_ray.storage import job_argv

if __name__ == "__main__":
    sys.exit(main(job_argv("sweep", sys.argv[1:])))
