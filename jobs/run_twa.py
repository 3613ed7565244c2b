"""The main job: sampling on Ray Train, then TWA-t / TWA-v, baselines and the report.

    ray job submit --working-dir . -- python jobs/run_twa.py --out /abs/path/runs/exp1 \
        --storage s3://my-twa-bucket/runs/exp1
    python jobs/run_twa.py --smoke-test --out runs/smoke        # local Ray, seconds

Inside ``ray job submit`` ``ray.init()`` joins the cluster; without one it starts a local Ray.
All flags of ``twa-ray run`` apply. On a cluster of several nodes every artifact goes to one
shared ``--storage`` (``s3://bucket/prefix``); without the flag the job uses
``$TWA_RAY_STORAGE/run/<name of --out>`` when cluster.yaml sets that variable.
"""

import sys

from twa_ray.cli import main
from twa_ray.storage import job_argv

if __name__ == "__main__":
    sys.exit(main(job_argv("run", sys.argv[1:])))
