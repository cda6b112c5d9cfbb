"""Package metadata for byol-tf.

The supported install is `scripts/ensure_venv`, which installs requirements.lock with
--no-deps (TFX 1.21's own metadata asks for ml-metadata / TFDV wheels that need glibc >= 2.39;
see DESIGN.md). The pins below state what the code is written against.
"""

import setuptools

setuptools.setup(
    name="byol-tf",
    version="0.1.0",
    description="BYOL self-supervised pretraining for TensorFlow/Keras 3, with a TFX pipeline.",
    python_requires=">=3.10,<3.13",
    packages=setuptools.find_packages(include=["byol_tf", "byol_tf.*", "components", "components.*", "pipeline", "pipeline.*"]),
    package_data={"": ["*.yaml"]},
    install_requires=[
        "tensorflow==2.21.0",
        "keras==3.15.1",
        "keras-cv==0.9.0",
        "tensorflow-datasets==4.9.10",
        "tensorboard==2.21.0",
        "tfx==1.21.0",
        "ml-metadata==1.17.1",
        "tensorflow-data-validation==1.16.1",
        "mlxtend==0.25.0",
        "PyYAML==6.0.4",
        "numpy==2.4.6",
        "pillow==12.3.0",
    ],
    extras_require={
        "kubeflow": ["kfp==2.16.1"],
        "dev": ["pytest==9.2.0", "pytest-timeout==2.4.0"],
    },
    entry_points={"console_scripts": ["byol-tf=byol_tf.cli:main"]},
)
