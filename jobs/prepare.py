"""Ray job: decode and preprocess an archive into the cache (``medhier prepare``).

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/prepare.py --archive s3://BUCKET/archive --output s3://BUCKET/cache \\
        --config configs/spine.yaml
"""

import sys

from medhier.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
