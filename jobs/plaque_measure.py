"""Ray job: measure an archive's visits into the plaque report, incrementally (``medhier plaque measure``).

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/plaque_measure.py --archive s3://BUCKET/carotid-mr \\
        --output s3://BUCKET/plaque [--segmentations s3://BUCKET/carotid-labels]

Run it on a schedule: each run measures only the visits that are new or changed since the last one (the ledger).
"""

import sys

from medhier.cli import main

if __name__ == "__main__":
    sys.exit(main(["plaque", "measure", *sys.argv[1:]]))
