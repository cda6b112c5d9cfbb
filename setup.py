"""Package metadata for byol-tf.

Three import packages, one distribution:

    byol_tf               the library (TensorFlow / Keras only; never imports TFX)
    byol_tfx.components   TFX components over the library (repository folder `components/`)
    byol_tfx.pipeline     the pipeline definition, runners and `byol-tf-pipeline` CLI (`pipeline/`)

`pip install byol-tf` installs the library and its dependencies only; `byol-tf[pipeline]` adds
TFX, `byol-tf[ann]` faiss for approximate neighbour search. The supported install is
`scripts/ensure_venv`, which installs the pinned, complete `requirements.lock` with --no-deps:
TFX 1.21's own metadata asks for ml-metadata and tensorflow-data-validation 1.21 wheels that
need glibc >= 2.39, and the lock swaps in 1.17.1 / 1.16.1, which run with TFX 1.21
(docs/DESIGN.md). The pins below state what the code is written against.
"""

import setuptools

setuptools.setup(
    name="byol-tf",
    version="0.2.0",
    description="BYOL self-supervised pretraining for TensorFlow/Keras 3, with a TFX pipeline.",
    python_requires=">=3.10,<3.13",
    packages=["byol_tf", "byol_tfx.components", "byol_tfx.pipeline"],
    # The repository keeps components/ and pipeline/ at the top; installed, they live under
    # byol_tfx so that byol-tf claims no generic top-level import names.
    package_dir={"byol_tfx.components": "components", "byol_tfx.pipeline": "pipeline"},
    package_data={"": ["*.yaml"]},
    install_requires=[
        "tensorflow==2.21.0",
        "keras==3.15.1",
        "tensorflow-datasets==4.9.10",
        # TFDS builders resolve their own files through importlib_resources (dataset_builder's
        # code_path); the `tfds build` command imports mlcroissant.
        "importlib_resources==7.1.0",
        "mlcroissant==1.1.1",
        "tensorboard==2.21.0",
        "mlxtend==0.25.0",
        "PyYAML==6.0.4",
        "numpy==2.4.6",
        "pillow==12.3.0",
        # PredictionLog / PredictRequest protos of the exports' TF Serving warm-up requests.
        "tensorflow-serving-api==2.19.1",
        "pyarrow==18.1.0",  # byol-tf embed writes Parquet
    ],
    extras_require={
        "pipeline": ["tfx==1.21.0", "ml-metadata==1.17.1", "tensorflow-data-validation==1.16.1"],
        "kubeflow": ["tfx==1.21.0", "kfp==2.16.1"],
        "dev": ["pytest==9.2.0", "pytest-timeout==2.4.0"],
        # Approximate nearest-neighbour search (`byol-tf neighbours --index hnsw`); exact search needs nothing.
        "ann": ["faiss-cpu==1.15.1"],
    },
    entry_points={
        "console_scripts": [
            "byol-tf=byol_tf.cli:main",
            "byol-tf-pipeline=byol_tfx.pipeline.cli:main",
        ]
    },
)
