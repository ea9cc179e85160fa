"""evomerge.checkpoints: read and write Hugging Face safetensors model directories."""

from evomerge.checkpoints.layers import (
    EMBEDDING_MARKERS,
    TENSOR_GROUPS,
    layer_index,
    layer_position,
    tensor_group,
)
from evomerge.checkpoints.model_dir import (
    INDEX_FILE,
    SINGLE_FILE,
    TOKENIZER_FILES,
    ModelDir,
    TensorInfo,
    safetensors_dtype_name,
    torch_dtype_from_safetensors,
)
from evomerge.checkpoints.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    ModelWriter,
    dtype_name,
    shard_file_name,
)

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "EMBEDDING_MARKERS",
    "INDEX_FILE",
    "SINGLE_FILE",
    "TENSOR_GROUPS",
    "TOKENIZER_FILES",
    "ModelDir",
    "ModelWriter",
    "TensorInfo",
    "dtype_name",
    "layer_index",
    "layer_position",
    "safetensors_dtype_name",
    "shard_file_name",
    "tensor_group",
    "torch_dtype_from_safetensors",
]
