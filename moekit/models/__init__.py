"""Language models built from the layers: the Mixtral-style decoder and its dense baseline."""

from moekit.models.transformer import (
    ModelOutput,
    Transformer,
    count_model_params,
    model_param_groups,
)

__all__ = ["ModelOutput", "Transformer", "count_model_params", "model_param_groups"]
