"""Ray job: predict the change factors of every patient's latest visit (``medhier plaque predict``):
register, segment, measure, predict, one Parquet row per latest visit, incrementally.

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/plaque_predict.py --archive s3://BUCKET/carotid-mr \\
        --patients s3://BUCKET/carotid-mr/patients.csv --model s3://BUCKET/plaque-model/v1 \\
        --output s3://BUCKET/plaque-predictions

Run it on a schedule: each run predicts only the latest visits that are new or changed since the
last one (a new visit, a corrected patient record, another model: the ledger).
"""

import sys

from medhier.cli import main

if __name__ == "__main__":
    sys.exit(main(["plaque", "predict", *sys.argv[1:]]))
