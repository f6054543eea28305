"""A BERT encoder in plain torch, laid out so that a BERT checkpoint's state dict loads into it
as it is (`load_state_dict(state, strict=True)`): the module and parameter names are the
checkpoint's keys. The defaults are all-MiniLM-L6-v2's config.json.

It returns the last hidden state, one vector per token; pooling is a step of the model's
pipeline, so the same encoder serves mean-pooled, CLS-pooled or per-token models. Inference
only: there is no dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BertEmbeddings(nn.Module):
    position_ids: torch.Tensor

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        max_positions: int,
        type_vocab_size: int,
        layer_norm_eps: float,
    ) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_positions, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        # Checkpoints carry `embeddings.position_ids`; keeping it as a persistent buffer lets
        # strict loading accept them, and slicing it gives positions already on the module's
        # device, with no tensor made on a device named here.
        self.register_buffer(
            "position_ids", torch.arange(max_positions).unsqueeze(0), persistent=True
        )

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        hidden = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(positions)
        )
        normed: torch.Tensor = self.LayerNorm(hidden)
        return normed


class BertSelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        return x.view(batch, length, self.num_heads, hidden // self.num_heads).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, size = hidden.shape
        context = F.scaled_dot_product_attention(
            self._heads(self.query(hidden)),
            self._heads(self.key(hidden)),
            self._heads(self.value(hidden)),
            attn_mask=bias,
        )
        return context.transpose(1, 2).reshape(batch, length, size)


class BertSelfOutput(nn.Module):
    def __init__(self, hidden_size: int, layer_norm_eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.LayerNorm(self.dense(context) + residual)
        return out


class BertAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, layer_norm_eps: float) -> None:
        super().__init__()
        self.self = BertSelfAttention(hidden_size, num_heads)
        self.output = BertSelfOutput(hidden_size, layer_norm_eps)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.output(self.self(hidden, bias), hidden)
        return out


class BertIntermediate(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # BERT's "gelu" is the exact (erf) form, not the tanh approximation.
        return F.gelu(self.dense(hidden))


class BertOutput(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, layer_norm_eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(intermediate_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, intermediate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.LayerNorm(self.dense(intermediate) + residual)
        return out


class BertLayer(nn.Module):
    def __init__(
        self, hidden_size: int, num_heads: int, intermediate_size: int, layer_norm_eps: float
    ) -> None:
        super().__init__()
        self.attention = BertAttention(hidden_size, num_heads, layer_norm_eps)
        self.intermediate = BertIntermediate(hidden_size, intermediate_size)
        self.output = BertOutput(hidden_size, intermediate_size, layer_norm_eps)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attended = self.attention(hidden, bias)
        out: torch.Tensor = self.output(self.intermediate(attended), attended)
        return out


class BertStack(nn.Module):
    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        layer_norm_eps: float,
    ) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(hidden_size, num_heads, intermediate_size, layer_norm_eps)
            for _ in range(num_layers)
        )

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, bias)
        return hidden


class BertPooler(nn.Module):
    """Checkpoints ship the pooler's weights, and strict loading wants a home for them; the
    encoder's forward does not use it (the pipeline pools)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertEncoder(nn.Module):
    """input_ids, attention_mask, token_type_ids (int64 [B, L]) -> token embeddings [B, L, H].

    Padded positions (attention_mask 0) are ignored as keys, so a sequence's vectors do not
    depend on how far its batch-mates made it be padded; the vectors at padded positions
    themselves are meaningless and left for pooling to mask out.
    """

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 384,
        num_layers: int = 6,
        num_heads: int = 12,
        intermediate_size: int = 1536,
        max_positions: int = 512,
        type_vocab_size: int = 2,
        layer_norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(
            vocab_size, hidden_size, max_positions, type_vocab_size, layer_norm_eps
        )
        self.encoder = BertStack(
            num_layers, hidden_size, num_heads, intermediate_size, layer_norm_eps
        )
        self.pooler = BertPooler(hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> torch.Tensor:
        hidden = self.embeddings(input_ids, token_type_ids)
        # An additive bias rather than a boolean mask: a row with every key masked (the
        # server's warm-up sends all-zero masks) then gets a uniform softmax instead of NaN.
        # Made from the mask, so it lives on the inputs' device; broadcast over heads and
        # queries.
        keep = attention_mask[:, None, None, :].to(hidden.dtype)
        bias = (1.0 - keep) * torch.finfo(hidden.dtype).min
        out: torch.Tensor = self.encoder(hidden, bias)
        return out
