# The container every Vertex AI / Kubeflow Pipelines step of the byol-tf pipeline runs in.
#
#   IMAGE=REGION-docker.pkg.dev/PROJECT/REPOSITORY/byol-tf:0.1.0
#   docker build -t $IMAGE . && docker push $IMAGE
#   byol-tf-pipeline compile --target vertex --config configs/mnist5k.yaml --out byol.json \
#       --image $IMAGE --pipeline-root gs://BUCKET/byol-tf
#
# Base: the TFX 1.21 image (Python, the KFP v2 executor launcher that each step runs as
# `python -m tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor`). Over it,
# the project's own lock is installed with --no-deps, so the steps run exactly the
# versions tested here (ml-metadata 1.17.1 and tensorflow-data-validation 1.16.1 swapped
# in for TFX's own pins, see docs/DESIGN.md), then this package (byol_tf, and components/ and
# pipeline/ installed as byol_tfx.components and byol_tfx.pipeline).
ARG TFX_IMAGE=gcr.io/tfx-oss-public/tfx:1.21.0
FROM ${TFX_IMAGE}

# requirements.lock is resolved for CPython 3.11 (numpy 2.4 has no 3.10 wheels): fail
# here with a message rather than halfway through pip on another Python.
RUN python -c "import sys; v = sys.version_info[:2]; sys.exit(0 if v == (3, 11) else \
'byol-tf: requirements.lock is resolved for Python 3.11, this base image has Python %d.%d: \
re-resolve the lock for it, or pass --build-arg TFX_IMAGE=<an image with Python 3.11>' % v)"

WORKDIR /byol-tf
COPY requirements.lock ./
RUN python -m pip install --no-cache-dir --no-deps -r requirements.lock

COPY setup.py ./
COPY byol_tf/ byol_tf/
COPY components/ components/
COPY pipeline/ pipeline/
COPY configs/ configs/
RUN python -m pip install --no-cache-dir --no-deps . \
 && python -m compileall -q "$(python -c 'import byol_tf, os; print(os.path.dirname(os.path.dirname(byol_tf.__file__)))')"/byol_tf*

# Importing tfx.v1 sets TF_USE_LEGACY_KERAS=1 for child processes unless it is set: this
# project is Keras 3 everywhere, Beam workers included.
ENV TF_USE_LEGACY_KERAS=0 \
    TF_CPP_MIN_LOG_LEVEL=2

# Smoke check at build time: the step entry points import.
RUN python -c "import byol_tfx.components.trainer_module, byol_tfx.components.linear_eval, \
byol_tfx.components.example_gen, byol_tfx.components.validation, byol_tfx.pipeline.pipeline; \
print('byol-tf image OK')"
