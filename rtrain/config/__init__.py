"""Recipe schema (pydantic v2, extra="forbid"), YAML loading and dotted CLI overrides.

Imports nothing of rtrain: every other layer depends on this one.
"""

from rtrain.config.recipe import (
    RECIPE_VERSION,
    Recipe,
    RecipeError,
    apply_overrides,
    load_recipe,
    loads_recipe,
    recipe_from_dict,
)
from rtrain.config.sections import (
    AnalysisConfig,
    CheckpointConfig,
    DataConfig,
    DistConfig,
    EvalConfig,
    LayerResponsesConfig,
    ModelConfig,
    OptimConfig,
    PrecisionConfig,
    RunConfig,
    ScheduleConfig,
    TrackingConfig,
    TrainConfig,
    dali_problems,
)

__all__ = [
    "RECIPE_VERSION", "Recipe", "RecipeError", "apply_overrides", "load_recipe", "loads_recipe",
    "recipe_from_dict", "AnalysisConfig", "CheckpointConfig", "DataConfig", "DistConfig", "EvalConfig", "LayerResponsesConfig", "ModelConfig",
    "OptimConfig", "PrecisionConfig", "RunConfig", "ScheduleConfig", "TrackingConfig", "TrainConfig",
    "dali_problems",
]
