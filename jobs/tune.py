"""Ray job: search fine-tuning depth and learning rates with Ray Tune (``medhier tune``).

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/tune.py --config configs/spine.yaml --archive s3://BUCKET/archive \\
        --output s3://BUCKET/search/spine-v1

If the job's driver dies, submit it again with --resume: finished trials are kept.
"""

import sys

from medhier.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
