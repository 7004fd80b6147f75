"""The build step pyproject.toml cannot express: ship the repository's configs/, ds_configs/ and
slurm/ folders inside the wheel, as omni_ds/configs/ etc., without moving them in the checkout.

Everything else (metadata, dependencies, the omni-ds script) is in pyproject.toml;
omni_ds.config.presets finds the folders in either place.
"""

from setuptools import find_packages, setup

SHIPPED = ("configs", "ds_configs", "slurm")

setup(
    packages=[
        *find_packages(include=["omni_ds", "omni_ds.*", "data_pipeline", "data_pipeline.*"]),
        *(f"omni_ds.{folder}" for folder in SHIPPED),
    ],
    package_dir={f"omni_ds.{folder}": folder for folder in SHIPPED},
    package_data={f"omni_ds.{folder}": ["*"] for folder in SHIPPED},
)
