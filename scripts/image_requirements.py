"""The image's runtime requirements: what `pip install --dry-run --report` resolved for
pipeline-stage[kfp] under constraints.txt, pinned, with the CPU-only TensorFlow wheel in place of the
full one (the same `tensorflow` module without the GPU kernels). Installed with --no-deps, since
tf-keras and tfmot declare a dependency on the `tensorflow` distribution by name.

    python scripts/image_requirements.py resolved.json > runtime.txt
"""

from __future__ import annotations

import json
import sys

SWAP = {"tensorflow": "tensorflow-cpu"}
SKIP = {"pipeline-stage"}  # installed from the source tree afterwards


def main(path: str) -> None:
    report = json.load(open(path))
    for item in report["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        key = name.lower().replace("_", "-")
        if key in SKIP:
            continue
        print(f"{SWAP.get(key, name)}=={version}")


if __name__ == "__main__":
    main(sys.argv[1])
