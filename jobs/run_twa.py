"""The main job: sampling on Ray Train, then TWA-t / TWA-v, baselines and the report.

    ray job submit --working-dir . -- python jobs/run_twa.py --out /abs/path/runs/exp1
    python jobs/run_twa.py --smoke-test --out runs/smoke        # local Ray, seconds

Inside ``ray job submit`` ``ray.init()`` joins the cluster; without one it starts a local Ray.
All flags of ``twa-ray run`` apply.
"""

import sys

from twa_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
