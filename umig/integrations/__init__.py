"""Bridges to the frameworks users already train and keep models with.

Each submodule needs its own optional extra and imports it at module level, so importing
``umig.integrations.flower`` without ``umig[flower]`` fails with a clear ``ImportError``
while ``import umig`` never needs any of them:

* :mod:`umig.integrations.flower` (``umig[flower]``): a Flower FedAvg strategy that records rounds.
* :mod:`umig.integrations.lightning` (``umig[lightning]``): a Lightning ``Callback`` that records fits.
* :mod:`umig.integrations.mlflow` (``umig[mlflow]``): import registered model versions, tag runs.
* :mod:`umig.integrations.hf` (``umig[hf]``): Hugging Face model cards with lineage and forgetting.
"""
