"""The asset graph: corpus -> activations -> sae [per config] -> features -> feature_labels; sweep_analysis.

Assets pass paths, not tensors: each publishes one folder under the storage root (atomically) and the next one
pulls it, so no IO manager ever loads every partition into memory, and on object storage each step can run on
another machine (see storage.Layout). One module per role: `data`, `training`, `interpretation`, `reports`
(and `common`, what they share).
"""

from sae_pipeline.defs.assets.common import (
    CODE_VERSIONS,
    DASHBOARD_DIR,
    ENV_AUTOMATION,
    ActivationsConfig,
    CorpusConfig,
    FeaturesConfig,
    LabelsConfig,
    automation_condition,
)
from sae_pipeline.defs.assets.data import activations, corpus
from sae_pipeline.defs.assets.interpretation import FEATURES_RUN_SIZE, feature_labels, features
from sae_pipeline.defs.assets.reports import calibration, sweep_analysis
from sae_pipeline.defs.assets.training import SAE_RUN_SIZE, sae

__all__ = ["CODE_VERSIONS", "DASHBOARD_DIR", "ENV_AUTOMATION", "FEATURES_RUN_SIZE", "SAE_RUN_SIZE",
           "ActivationsConfig", "CorpusConfig", "FeaturesConfig", "LabelsConfig", "activations",
           "automation_condition", "calibration", "corpus", "feature_labels", "features", "sae", "sweep_analysis"]
