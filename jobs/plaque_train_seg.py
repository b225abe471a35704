"""Ray job: train the plaque segmentation model on an archive's labelled visits (``medhier plaque train-seg``).

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/plaque_train_seg.py --archive s3://BUCKET/carotid-mr \\
        --output s3://BUCKET/runs/plaque-seg-v1 --config configs/plaque.yaml train.use_gpu=true

Resubmitting with the same --output resumes from its last checkpoint.
"""

import sys

from medhier.cli import main

if __name__ == "__main__":
    sys.exit(main(["plaque", "train-seg", *sys.argv[1:]]))
