"""Ray job: segment every new or changed visit with a trained model, a DICOM SEG per visit and
the measurements (``medhier plaque segment``).

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/plaque_segment.py --archive s3://BUCKET/carotid-mr \\
        --checkpoint s3://BUCKET/runs/plaque-seg-v1/best --output s3://BUCKET/plaque-seg

Run it on a schedule: each run segments only the visits that are new or changed since the last one (the ledger).
"""

import sys

from medhier.cli import main

if __name__ == "__main__":
    sys.exit(main(["plaque", "segment", *sys.argv[1:]]))
