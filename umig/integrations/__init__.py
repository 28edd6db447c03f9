"""Bridges to the frameworks users already train and keep models with.

``flower`` and ``lightning`` import their framework at module level, so importing
``umig.integrations.flower`` without ``umig[flower]`` fails with a clear ``ImportError`` naming
the extra; ``mlflow`` imports MLflow only when a function runs (the CLI imports the module, and
should not pay for MLflow on every command), failing then with a ``UmigError`` naming the extra;
``hf`` uses ``huggingface_hub`` when it is installed and writes the same card without it
(``umig card`` always works). ``import umig`` never needs any of them:

* :mod:`umig.integrations.flower` (``umig[flower]``): a Flower FedAvg strategy that records rounds.
* :mod:`umig.integrations.lightning` (``umig[lightning]``): a Lightning ``Callback`` that records fits.
* :mod:`umig.integrations.mlflow` (``umig[mlflow]``): import registered model versions, tag runs,
  register every node version (``umig mlflow sync``).
* :mod:`umig.integrations.hf` (``umig[hf]``): Hugging Face model cards with lineage and forgetting (``umig card``,
  ``umig export NODE --model-card DIR``).
"""
