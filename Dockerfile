# pipeline-stage image: runs `pipeline-stage ARGS` (or a command of its own), non-root, no build tools or caches.
#
# Registry build:  docker build -t pipeline-stage:0.1.0 .
#                  docker build --build-arg EXTRAS=kfp,s3,gcs,torch -t pipeline-stage:0.1.0-torch .
#                  docker build --build-arg EXTRAS=kfp,s3,gcs,intel --build-arg VENDOR_SDKS=intel -t pipeline-stage:0.1.0-intel .
#                  (NPU compiler images, one per vendor: docs/accelerators.md)
# Offline build:   scripts/build-image.sh   (a debootstrapped Debian base and a local wheelhouse;
#                  VARIANT=torch for the PyTorch variant)
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# A bare Debian base (the offline build) has no Python: Debian 12 gives 3.11.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates && rm -rf /var/lib/apt/lists/*; \
    fi
# binutils: `strip` for TensorFlow's shared libraries below (build stage only).
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
# PIP_EXTRA: e.g. "--no-index --find-links /wheels" for a build from the local wheelhouse.
ARG PIP_EXTRA=""
# EXTRAS: the package's extras in the image; "kfp,s3,gcs,torch" is the PyTorch variant
# (pipeline-stage:<version>-torch: the `pytorch` source and the `pt2e` engine, with litert-torch).
ARG EXTRAS="kfp,s3,gcs"
COPY wheels/ /wheels/
COPY constraints.txt pyproject.toml README.md /src/
COPY scripts/image_requirements.py scripts/image_bytecode.py /src/scripts/
COPY pipeline_stage/ /src/pipeline_stage/
COPY plugins/ /src/plugins/
# pipeline-stage[EXTRAS] resolved under the constraints, then installed with tensorflow-cpu in place
# of tensorflow (274 MB wheel vs 572 MB): tf-keras declares `tensorflow`, so a plain install would
# pull the full wheel in beside the CPU one; hence --no-deps on the resolved, pinned set. MLflow is
# the client only (mlflow-skinny): the server, the sqlite store, pyarrow and scikit-learn are in
# the `local` extra, which a pipeline step talking to a tracking server does not need.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir $PIP_EXTRA --upgrade pip "setuptools>=77" \
    && /opt/venv/bin/pip install --no-cache-dir $PIP_EXTRA -q -c /src/constraints.txt \
        --dry-run --ignore-installed --report /tmp/resolved.json "/src[${EXTRAS}]" \
    && /opt/venv/bin/python /src/scripts/image_requirements.py /tmp/resolved.json > /tmp/runtime.txt \
    && /opt/venv/bin/pip install --no-cache-dir $PIP_EXTRA --no-deps -r /tmp/runtime.txt \
    && /opt/venv/bin/pip install --no-cache-dir $PIP_EXTRA --no-deps /src \
    && find /opt/venv -name __pycache__ -prune -exec rm -rf {} + \
    # C++ headers for building TF custom ops (430 MB): not needed to convert or run models
    && rm -rf /opt/venv/lib/python3.11/site-packages/tensorflow/include \
    # TensorFlow's shared libraries ship with their static symbol tables (about 300 MB); stripping
    # keeps the dynamic symbols that loading uses. Not the other wheels': auditwheel (patchelf)
    # rewrote theirs, and strip breaks those (numpy's OpenBLAS: "ELF load command ... not page-aligned").
    && find /opt/venv/lib/python3.11/site-packages/tensorflow -type f \( -name "*.so" -o -name "*.so.*" \) \
        -exec strip --strip-unneeded {} + \
    # libclang (61 MB): TensorFlow declares it, no code path of the stage imports it
    && /opt/venv/bin/pip uninstall -y -q libclang \
    # the test suites that pandas, scipy, numpy and matplotlib ship (about 45 MB)
    && for p in pandas scipy numpy matplotlib; do \
           find /opt/venv/lib/python3.11/site-packages/$p -type d -name tests -prune -exec rm -rf {} +; done \
    # botocore's models of every AWS service (28 MB): the S3 client needs S3's, and web identity
    # (IRSA) credentials STS's; boto3's resource models likewise
    && find /opt/venv/lib/python3.11/site-packages/botocore/data -mindepth 1 -maxdepth 1 -type d \
        ! -name s3 ! -name sts -exec rm -rf {} + \
    && find /opt/venv/lib/python3.11/site-packages/boto3/data -mindepth 1 -maxdepth 1 -type d ! -name s3 -exec rm -rf {} + \
    # bytecode for what the stage imports (not the whole venv): a run takes half the time (bench/bench_image.py)
    && /opt/venv/bin/python /src/scripts/image_bytecode.py /opt/venv/lib/python3.11/site-packages
# VENDOR_SDKS: LiteRT's NPU vendor SDKs for `compile` targets, space-separated among intel, qualcomm,
# mediatek, google-tensor. Each `ai-edge-litert-sdk-<vendor>` package downloads its vendor's compiler
# libraries from the vendor's servers while it installs, so this layer needs that network (the
# offline build cannot have it); intel also needs EXTRAS with `intel` (OpenVINO). docs/accelerators.md.
ARG VENDOR_SDKS=""
RUN for vendor in $VENDOR_SDKS; do \
        /opt/venv/bin/pip install --no-cache-dir --no-deps "ai-edge-litert-sdk-${vendor}==2.3.0" || exit 1; \
    done

FROM ${BASE_IMAGE}
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 ca-certificates && rm -rf /var/lib/apt/lists/* /var/cache/apt/*; \
    fi \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin stage
# The venv belongs to `stage` so that a derived image can add an in-house plugin with one
# `RUN pip install ...` line; the process still runs unprivileged.
COPY --from=build --chown=1000:1000 /opt/venv /opt/venv
COPY manifests/ /opt/pipeline-stage/manifests/
COPY scripts/entrypoint.sh /opt/pipeline-stage/entrypoint.sh
ENV PATH=/opt/venv/bin:$PATH \
    PIPELINE_STAGE_EXAMPLES=/opt/pipeline-stage/manifests/examples \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib
USER 1000:1000
WORKDIR /home/stage
# pipeline-stage with the arguments given, or a command of its own (sh, python3, /path): KFP's
# DockerRunner passes a component's command as arguments (scripts/entrypoint.sh)
ENTRYPOINT ["/opt/pipeline-stage/entrypoint.sh"]
CMD ["--help"]
