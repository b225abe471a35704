"""Ray job: train the hierarchical model with Ray Train (``medhier train``).

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/train.py --config configs/spine.yaml --archive s3://BUCKET/archive \\
        --output s3://BUCKET/runs/spine-v1

Re-submitting with the same --output resumes from the last checkpoint.
"""

import sys

from medhier.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
