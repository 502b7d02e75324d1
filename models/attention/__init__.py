"""Attention kernels: exact softmax, NTK-Attention, sparse top-k and streaming sketch attention
(with its CountSketch output layer).

``ATTENTION`` is the registry behind the config key ``model.attention``; ``install_attention(model, name, **params)``
switches a transformers model (ViT, BERT, GPT-2) to a kernel in place.
"""

from models.attention.countsketch import CountSketch, sketch_size
from models.attention.kernels import ATTENTION, AttentionKernel, attention_modules, install_attention
from models.attention.lse import attention_lse, attention_lse_reference
from models.attention.ntk import NTKPrefix, ntk_attention, ntk_attention_reference, ntk_phi, prefix_attention
from models.attention.sketch import (
    StreamingSketchAttention, sketch_attention, sketched_causal_attention, taylor_features,
)
from models.attention.sparse import sparse_threshold_attention, sparse_topk_attention, tail_mass, topk_schedule

__all__ = [
    "ATTENTION", "AttentionKernel", "attention_modules", "install_attention",
    "attention_lse", "attention_lse_reference",
    "NTKPrefix", "ntk_attention", "ntk_attention_reference", "ntk_phi", "prefix_attention",
    "CountSketch", "sketch_size",
    "StreamingSketchAttention", "sketch_attention", "sketched_causal_attention", "taylor_features",
    "sparse_threshold_attention", "sparse_topk_attention", "tail_mass", "topk_schedule",
]
