"""The decoder-only language model: embedding -> [mixer + SwiGLU MLP] x n_layers -> norm -> LM head.

    model = Transformer(cfg.model)          # or on the meta device, then model.init_weights()
    logits = model(tokens)                  # [B, T, vocab]
    hidden = model(tokens, return_hidden=True)  # [B, T, dim], final norm applied; model.output -> logits

The model runs on one device and knows nothing of process groups. Under context parallelism it is
given its tokens' `SeqLayout` (their global positions) and its mixers' cores are swapped by
`longctx.parallel`. A layout with `docs` (packed documents) keeps every mixer inside each token's
document, and with `docs.per_doc_positions` RoPE positions restart at each document start.
"""

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from longctx.config import ModelConfig
from longctx.model.layers import SwiGLU
from longctx.model.mixers import build_mixer
from longctx.model.mixers.nsa import BlockCompressor
from longctx.model.rope import rope_cos_sin, rope_inv_freq
from longctx.parallel.layout import SeqLayout


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, letter: str):
        super().__init__()
        self.letter = letter
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mixer = build_mixer(letter, cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden_dim)

    def forward(self, x, cos, sin, layout):
        x = x + self.mixer(self.attention_norm(x), cos, sin, layout)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, letter) for letter in cfg.pattern)
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        inv_freq, self.rope_mscale = rope_inv_freq(cfg.head_dim, cfg.rope)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        self.activation_checkpointing = False

    def tie_weights(self) -> None:
        """Share the embedding and LM-head matrix if configured (again after `to_empty`)."""
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (also after building on the meta device and `to_empty`)."""
        std = self.cfg.init_std
        # Residual-branch outputs shrink with depth so the residual stream keeps its scale.
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith(("mixer.wo", "mlp.w2"))
                nn.init.normal_(module.weight, std=out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, BlockCompressor):
                module.init_weights(std)
        inv_freq, self.rope_mscale = rope_inv_freq(self.cfg.head_dim, self.cfg.rope)
        self.rope_inv_freq.copy_(inv_freq)

    def forward(
        self, tokens: torch.Tensor, layout: SeqLayout | None = None, return_hidden: bool = False
    ) -> torch.Tensor:
        """Logits `[B, T, vocab]` for `tokens` `[B, T]` (a whole sequence, or a shard given `layout`).

        With `return_hidden` the final-norm hidden states `[B, T, dim]` instead: `model.output` of
        them gives the logits, so a caller that needs a few positions' logits (the needle evaluation)
        projects only those and never holds `[B, T, vocab]`.
        """
        if layout is None:
            layout = SeqLayout.full(tokens.shape[1])
        if tokens.shape[1] != layout.local_len:
            raise ValueError(f"got {tokens.shape[1]} tokens but the layout holds {layout.local_len}")
        positions = layout.positions(tokens.device)
        if layout.docs is not None:
            # Global, or counted from each document's start (data.doc_positions): [T] or [B, T].
            positions = layout.docs.rope_positions(positions)
        cos, sin = rope_cos_sin(positions, self.rope_inv_freq, self.rope_mscale)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, layout, use_reentrant=False)
            else:
                h = layer(h, cos, sin, layout)
        h = self.norm(h)
        return h if return_hidden else self.output(h)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> Transformer:
    """Build on the meta device, materialise on `device`, and initialise (seed the RNG first)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights()
    return model
