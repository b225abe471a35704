"""Ray job: fit the plaque change-factor model (``medhier plaque fit``): mean, ridge and XGBoost
on Ray Train side by side on one patient-level split, with prediction intervals.

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/plaque_fit.py --measurements s3://BUCKET/plaque \\
        --patients s3://BUCKET/carotid-mr/patients.csv --output s3://BUCKET/plaque-model/v1 \\
        predict.num_workers=2

The output holds model/, metrics.json, the plots and the resolved config; a re-run writes them again.
"""

import sys

from medhier.cli import main

if __name__ == "__main__":
    sys.exit(main(["plaque", "fit", *sys.argv[1:]]))
