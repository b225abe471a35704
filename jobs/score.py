"""Ray job: score an archive into the Parquet report, incrementally (``medhier score``).

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/score.py --archive s3://BUCKET/archive \\
        --checkpoint s3://BUCKET/runs/spine-v1/best --output s3://BUCKET/scores --max-error-rate 0.05

Run it nightly: each run scores only what is new or changed since the last one (the ledger).
"""

import sys

from medhier.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
