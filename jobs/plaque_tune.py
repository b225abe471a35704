"""Ray job: search the plaque model's XGBoost parameters with Ray Tune, then fit the best
(``medhier plaque tune``).

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/plaque_tune.py --measurements s3://BUCKET/plaque \\
        --patients s3://BUCKET/carotid-mr/patients.csv --output s3://BUCKET/plaque-search/v1

If the job's driver dies, submit it again with --resume: finished trials are kept.
"""

import sys

from medhier.cli import main

if __name__ == "__main__":
    sys.exit(main(["plaque", "tune", *sys.argv[1:]]))
