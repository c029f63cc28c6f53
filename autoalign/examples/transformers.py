"""Tiny Hugging Face transformers built from their config classes (random weights, no download).

Six architectures that ``torch.fx`` cannot trace and the ``torch.export`` front end
can (:mod:`autoalign.trace.export`): BERT, DistilBERT, RoBERTa, GPT-2 (``Conv1D``
layers holding transposed weights, tied input/output embeddings), ViT, and a
Llama-style decoder (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention).
Used by the tests, ``benchmarks/transformers_coverage.py`` and the docs; needs the
``transformers`` extra (``pip install "autoalign[transformers]"``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TINY_TRANSFORMERS", "tiny_transformer", "tiny_inputs"]

#: The architectures :func:`tiny_transformer` builds.
TINY_TRANSFORMERS: tuple[str, ...] = ("bert", "distilbert", "roberta", "gpt2", "vit", "llama")
VOCAB = 97


def tiny_inputs(name: str, seed: int = 0, batch: int = 8) -> torch.Tensor:
    """Random inputs for one of :data:`TINY_TRANSFORMERS`.

    Returns
    -------
    Tensor
        Token ids of shape ``(batch, 9)`` in ``[3, 97)``, or images of shape
        ``(batch, 3, 16, 16)`` for ``"vit"``.
    """
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return torch.randn(batch, 3, 16, 16, generator=g)
    return torch.randint(3, VOCAB, (batch, 9), generator=g)


def tiny_transformer(name: str, seed: int = 0, *, init_std: float = 0.2) -> tuple[nn.Module, torch.Tensor]:
    """A tiny model of one architecture in eval mode, and a batch of two example inputs.

    Parameters
    ----------
    name : str
        One of :data:`TINY_TRANSFORMERS`.
    seed : int, default 0
        Seed of the initialisation (and of the example inputs).
    init_std : float, default 0.2
        The config's ``initializer_range``: larger than the default 0.02 so that outputs
        are of order one and a wrong merge spec cannot hide under a self-check's tolerance.

    Returns
    -------
    model : nn.Module
        Hidden size 32, 2 layers, 4 heads (2 key/value heads for Llama), MLP width 64.
    inputs : Tensor
        :func:`tiny_inputs` with ``batch=2``.

    Raises
    ------
    ValueError
        For an unknown name.
    """
    import transformers as T

    if name not in TINY_TRANSFORMERS:
        raise ValueError(f"unknown tiny transformer {name!r}; choose one of {', '.join(TINY_TRANSFORMERS)}")
    torch.manual_seed(seed)
    common = {"initializer_range": init_std}
    layers = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    if name == "bert":
        model = T.BertForSequenceClassification(
            T.BertConfig(vocab_size=VOCAB, max_position_embeddings=32, num_labels=3, **layers, **common))
    elif name == "distilbert":
        model = T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32, num_labels=3,
            **common))
    elif name == "roberta":
        model = T.RobertaForSequenceClassification(
            T.RobertaConfig(vocab_size=VOCAB, max_position_embeddings=40, num_labels=3, **layers, **common))
    elif name == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2, **common))
    elif name == "vit":
        model = T.ViTForImageClassification(
            T.ViTConfig(image_size=16, patch_size=4, num_channels=3, num_labels=3, **layers, **common))
    else:
        model = T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=VOCAB, max_position_embeddings=32, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
            **layers, **common))
    return model.eval(), tiny_inputs(name, seed, batch=2)
