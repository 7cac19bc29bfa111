"""The decoder-only language model: embedding -> [mixer + SwiGLU MLP] x n_layers -> norm -> LM head.

    model = Transformer(cfg.model)          # or on the meta device, then model.init_weights()
    logits = model(tokens)                  # [B, T, vocab]
    hidden = model(tokens, return_hidden=True)  # [B, T, dim], final norm applied; model.output -> logits
    losses, correct = model(tokens, targets=targets)  # [B, T] fp32 and bool; logits never whole

Activation memory: `model.activation_checkpointing` is "none", "full" (each block recomputed in the
backward; only block inputs are kept) or "selective" (the MLP half of each block and its norm are
recomputed, the mixer keeps its saved tensors) or "every_k" (every `model.checkpoint_every_k`-th
block, from the first, is recomputed whole; the others keep everything); `model.activation_offload=True`
moves what is saved
for the backward to pinned host memory (`torch.autograd.graph.save_on_cpu`). `model.loss_chunk` is the
token chunk of the LM head and loss (`longctx.model.loss`; 0: automatic).

The model runs on one device and knows nothing of process groups. Under context parallelism it is
given its tokens' `SeqLayout` (their global positions) and its mixers' cores are swapped by
`longctx.parallel`. A layout with `docs` (packed documents) keeps every mixer inside each token's
document, and with `docs.per_doc_positions` RoPE positions restart at each document start.
"""

import contextlib
import hashlib
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from longctx.config import ModelConfig
from longctx.model.layers import SwiGLU
from longctx.model.loss import liger_linear_cross_entropy, linear_cross_entropy
from longctx.model.mixers import build_mixer
from longctx.model.mixers.delta import GatedDeltaNet
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

    def forward(self, x, cos, sin, layout, selective: bool = False):
        x = x + self.mixer(self.attention_norm(x), cos, sin, layout)
        if selective:
            # Recompute the MLP and its norm in the backward: they hold most of a block's saved bytes
            # at short context and cost a small share of its FLOPs at long context.
            return checkpoint(self.mlp_half, x, use_reentrant=False)
        return self.mlp_half(x)

    def mlp_half(self, x):
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
        self.activation_checkpointing = "none"
        self.activation_offload = False
        self.checkpoint_every_k = 2
        self.loss_chunk = 0
        self.loss_impl = "chunked"

    def tie_weights(self) -> None:
        """Share the embedding and LM-head matrix if configured (again after `to_empty`)."""
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_rules(self) -> dict[str, tuple[str, float]]:
        """How each parameter starts: `{name: ("normal", std) | ("uniform", bound) | ("ones", 0) |
        ("zeros", 0) | ("fn", make)}`, `make(shape)` giving a deterministic full tensor."""
        std = self.cfg.init_std
        # Residual-branch outputs shrink with depth so the residual stream keeps its scale.
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        rules = {}
        for name, module in self.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, nn.Linear):
                is_out = name.endswith(("mixer.wo", "mlp.w2"))
                rules[prefix + "weight"] = ("normal", out_std if is_out else std)
                if module.bias is not None:
                    rules[prefix + "bias"] = ("zeros", 0.0)
            elif isinstance(module, nn.Embedding):
                rules[prefix + "weight"] = ("normal", std)
            elif isinstance(module, nn.RMSNorm):
                rules[prefix + "weight"] = ("ones", 0.0)
            elif isinstance(module, BlockCompressor):
                for key, value in module.init_rules(std).items():
                    rules[prefix + key] = value
            elif isinstance(module, GatedDeltaNet):
                for key, value in module.init_rules().items():
                    rules[prefix + key] = value
        return rules

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter (also after building on the meta device, sharding and `to_empty`).

        Each parameter draws from its own generator seeded by `seed` and its name, on the full-size
        tensor, of which a sharded (FSDP2 DTensor) parameter keeps its slice: the initial weights
        depend on the seed and the device type only, not on the number of ranks or the engine.
        `seed=None` takes one from the global RNG (seed it first).
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        rules = self.init_rules()
        for name, param in self.named_parameters():
            kind, std = rules[name]
            init_param(param, kind, std, param_seed(seed, name))
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Fill the buffers (RoPE frequencies) after `to_empty` or a materialisation of them alone."""
        inv_freq, self.rope_mscale = rope_inv_freq(self.cfg.head_dim, self.cfg.rope)
        self.rope_inv_freq.copy_(inv_freq)

    def forward(
        self,
        tokens: torch.Tensor,
        layout: SeqLayout | None = None,
        return_hidden: bool = False,
        targets: torch.Tensor | None = None,
    ):
        """Logits `[B, T, vocab]` for `tokens` `[B, T]` (a whole sequence, or a shard given `layout`).

        With `return_hidden` the final-norm hidden states `[B, T, dim]` instead: `model.output` of
        them gives the logits, so a caller that needs a few positions' logits (the needle evaluation)
        projects only those and never holds `[B, T, vocab]`.

        With `targets` `[B, T]` the per-token next-token losses `[B, T]` (fp32) and whether each
        token's argmax is its target `[B, T]` (bool), computed over `model.loss_chunk`-token chunks so
        the logits are never whole (the LM head runs inside forward, where FSDP has gathered it).
        With `model.loss_impl = "liger"` (CUDA), Liger Kernel's fused loss: the summed loss and None.
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
        mode = self.checkpoint_mode() if torch.is_grad_enabled() else "none"
        offload = torch.autograd.graph.save_on_cpu(pin_memory=h.is_cuda) if self.activation_offload else None
        with offload or contextlib.nullcontext():
            for i, layer in enumerate(self.layers):
                if mode == "full" or mode == "every_k" and i % self.checkpoint_every_k == 0:
                    h = checkpoint(layer, h, cos, sin, layout, use_reentrant=False)
                else:
                    h = layer(h, cos, sin, layout, selective=mode == "selective")
        h = self.norm(h)
        if targets is not None and self.loss_impl == "liger":
            return liger_linear_cross_entropy(h, self.output.weight, targets), None
        if targets is not None:
            return linear_cross_entropy(h, self.output.weight, targets, self.loss_chunk)
        return h if return_hidden else self.output(h)

    def checkpoint_mode(self) -> str:
        """ "none" | "full" | "selective" | "every_k" (the boolean of older callers: True is "full")."""
        mode = self.activation_checkpointing
        if isinstance(mode, bool):
            return "full" if mode else "none"
        if mode not in ("none", "full", "selective", "every_k"):
            raise ValueError(
                f"activation_checkpointing must be none, full, selective or every_k, got {mode!r}"
            )
        if mode == "every_k" and self.checkpoint_every_k < 1:
            raise ValueError(f"checkpoint_every_k must be >= 1, got {self.checkpoint_every_k}")
        return mode

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def param_seed(seed: int, name: str) -> int:
    """A parameter's own generator seed, from the run's seed and the parameter's name."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def init_param(param: torch.Tensor, kind: str, std: float, seed: int) -> None:
    """Fill `param` (a tensor or a sharded DTensor, whose local slice is written) by `kind`."""
    local = param.to_local() if hasattr(param, "to_local") else param
    if kind == "ones":
        local.fill_(1.0)
        return
    if kind == "zeros":
        local.zero_()
        return
    if kind == "fn":
        full = std(param.shape).to(dtype=local.dtype, device=local.device)
    else:
        generator = torch.Generator(device=local.device)
        generator.manual_seed(seed)
        # A whole parameter is drawn into in place: no second full-size tensor next to it.
        full = param if local is param else torch.empty(param.shape, dtype=local.dtype, device=local.device)
        if kind == "uniform":
            full.uniform_(-std, std, generator=generator)
        else:
            full.normal_(0.0, std, generator=generator)
    if local is not param:
        from torch.distributed.tensor import distribute_tensor

        # The slice this rank keeps, cut locally (no communication).
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
    if full is not local:
        local.copy_(full)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = None) -> Transformer:
    """Build on the meta device, materialise on `device`, and initialise from `seed` (None: from the
    global RNG, so seed it first). `device="meta"` returns the model unmaterialised."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if torch.device(device).type == "meta":
        # Left for the caller to shard, materialise (`to_empty`) and `init_weights(seed)`.
        return model
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)
    return model
