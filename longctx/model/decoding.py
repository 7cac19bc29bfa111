"""Incremental decoding: one cache per layer, a prefill through the training kernels, then a token a step.

    cache = ModelCache.empty(model, batch=1)
    logits = prefill(model, tokens, cache)          # [B, vocab]: the next token's logits
    logits = decode_step(model, next_tok, cache)    # [B, vocab], next_tok [B]

Every mixer letter registers a `Decoder`, the trio a new mixer implements to decode:

    @register_decoder("G")
    class GatedDeltaDecoder(Decoder):
        def init_cache(self, mixer, batch): ...            # an empty cache object for one layer
        def prefill(self, mixer, x, cos, sin, layout, cache): ...   # [B, T, dim] out; fills cache
        def step(self, mixer, x, cos, sin, cache): ...      # [B, 1, dim] out for the next position

`prefill` runs the mixer's own core (the training kernel, or its context-parallel replacement) and
keeps what later tokens need; `step` computes the newest token's output from the cache alone. A cache
reports the bytes it holds (`nbytes`), so memory per generated token is measured by mixer.

- D, S: keys and values. D attends its window (all keys without one); S attends only the key blocks
  its pattern allows the current query block, gathered per head.
- N: keys and values plus the compressed tokens; a compressed token is added each `cmp_stride` tokens,
  once its `cmp_block`-token block is complete. Each step selects its `slc_top` blocks from the
  compression branch's probabilities and attends the gathered blocks, and the window's keys.
- L: the `[B, H, Dk, Dv]` fp32 state, the same size whatever the context length.
- G: the delta rule's `[B, H, Dk, Dv]` fp32 state plus the last 3 pre-convolution inputs (the
  convolution's window), also constant in size.
"""

import torch
import torch.nn.functional as F

from longctx.kernels import (
    flash_attn_chunk,
    gated_delta_rule,
    gated_linear_attn,
    gated_linear_attn_step,
    nsa_cmp_attn,
    nsa_select_blocks,
)
from longctx.kernels.s2_attn.naive import s2_block_mask
from longctx.model.mixers.nsa import mix_branches
from longctx.model.rope import rope_cos_sin
from longctx.parallel.layout import SeqLayout


class Decoder:
    """How one mixer kind prefills and steps (module docstring). Stateless: state lives in caches."""

    def init_cache(self, mixer, batch: int):
        raise NotImplementedError

    def prefill(self, mixer, x, cos, sin, layout, cache) -> torch.Tensor:
        raise NotImplementedError

    def step(self, mixer, x, cos, sin, cache) -> torch.Tensor:
        raise NotImplementedError

    def gather(self, mixer, cache, layout, group) -> None:
        """After a context-parallel prefill of this rank's zigzag shard (`layout`), make `cache` the
        whole prompt's, as a one-process prefill would have left it (every rank then decodes)."""
        raise NotImplementedError(f"{type(self).__name__} cannot follow a context-parallel prefill")


DECODERS: dict[str, Decoder] = {}


def register_decoder(letter: str):
    """Class decorator: register a `Decoder` for the mixer of `letter`."""

    def wrap(cls):
        if letter in DECODERS:
            raise ValueError(
                f"mixer letter {letter!r} already has the decoder {type(DECODERS[letter]).__name__}"
            )
        DECODERS[letter] = cls()
        return cls

    return wrap


def decoder_for(mixer) -> Decoder:
    letter = getattr(type(mixer), "letter", "?")
    if letter not in DECODERS:
        raise ValueError(
            f"the {type(mixer).__name__} mixer ({letter!r}) has no decoder, so it cannot generate; "
            "register one with longctx.model.decoding.register_decoder"
        )
    return DECODERS[letter]


class KVCache:
    """Keys and values `[B, T, H_kv, D]` of every token so far, in a buffer that grows by doubling."""

    def __init__(self):
        self.k = self.v = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        new = self.length + k.shape[1]
        if self.k is None or new > self.k.shape[1]:
            size = max(new, 2 * (0 if self.k is None else self.k.shape[1]), 16)
            grown_k = k.new_empty(k.shape[0], size, *k.shape[2:])
            grown_v = v.new_empty(v.shape[0], size, *v.shape[2:])
            if self.k is not None:
                grown_k[:, : self.length] = self.k[:, : self.length]
                grown_v[:, : self.length] = self.v[:, : self.length]
            self.k, self.v = grown_k, grown_v
        self.k[:, self.length : new] = k
        self.v[:, self.length : new] = v
        self.length = new

    def keys(self, start: int = 0, end: int | None = None):
        end = self.length if end is None else end
        return self.k[:, start:end], self.v[:, start:end]

    def nbytes(self) -> int:
        """Bytes of the keys and values held (the filled part of the buffer)."""
        if self.k is None:
            return 0
        return 2 * self.length * (self.k[:, :1].numel() * self.k.element_size())


def _gather_kv(cache: KVCache, group) -> None:
    from longctx.parallel import zigzag_unshard
    from longctx.parallel.comm import all_gather_tensor as all_gather

    k, v = cache.keys()
    full_k = zigzag_unshard(list(all_gather(k.contiguous(), group).unbind(0)))
    full_v = zigzag_unshard(list(all_gather(v.contiguous(), group).unbind(0)))
    cache.k = cache.v = None
    cache.length = 0
    cache.append(full_k, full_v)


class NSACache(KVCache):
    """N's keys and values plus its compressed keys and values `[B, Tc, H_kv, D]`."""

    def __init__(self):
        super().__init__()
        self.compressed = KVCache()

    def nbytes(self) -> int:
        return super().nbytes() + self.compressed.nbytes()


class StateCache:
    """L's recurrent state `[B, H, Dk, Dv]` (fp32), constant in size."""

    def __init__(self):
        self.state = None
        self.length = 0

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.numel() * self.state.element_size()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One query per head over gathered keys, in fp32: q `[B, H, D]`, k, v `[B, H, L, D]`, valid
    broadcastable to `[B, H, L]` (at least one key valid per row). Returns `[B, 1, H, D]` in q's dtype."""
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bhd,bhld->bhl", q.float(), k.float()) * scale
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.einsum("bhl,bhld->bhd", probs, v.float()).to(q.dtype)[:, None]


def _gather_blocks(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`x` `[B, T, H_kv, D]` at `tokens` `[B, H_kv, L]` (clamped to `[0, T)`) -> `[B, H_kv, L, D]`."""
    index = tokens.clamp(0, x.shape[1] - 1)[..., None].expand(-1, -1, -1, x.shape[-1])
    return x.transpose(1, 2).gather(2, index)


@register_decoder("D")
class DenseDecoder(Decoder):
    def init_cache(self, mixer, batch):
        return KVCache()

    def prefill(self, mixer, x, cos, sin, layout, cache):
        q, k, v = mixer.qkv(x, cos, sin)
        cache.append(k, v)
        return mixer.wo(mixer.core(q, k, v, layout).flatten(2))

    def step(self, mixer, x, cos, sin, cache):
        q, k, v = mixer.qkv(x, cos, sin)
        cache.append(k, v)
        pos, window = cache.length - 1, mixer.core.window
        start = 0 if window is None else max(0, pos - window + 1)
        keys, values = cache.keys(start)
        o, _ = flash_attn_chunk(q, keys, values, q_offset=pos, k_offset=start, causal=True, window=window)
        return mixer.wo(o.flatten(2))

    def gather(self, mixer, cache, layout, group):
        _gather_kv(cache, group)


@register_decoder("S")
class S2Decoder(Decoder):
    """Each query head gathers the key blocks S2 allows its block (local ones and its strided ones)."""

    def init_cache(self, mixer, batch):
        cache = KVCache()
        cache.plan = None  # (query block, token index [H, L], valid [H, L]) of the current block
        return cache

    def prefill(self, mixer, x, cos, sin, layout, cache):
        q, k, v = mixer.qkv(x, cos, sin)
        cache.append(k, v)
        return mixer.wo(mixer.core(q, k, v, layout).flatten(2))

    @staticmethod
    def _plan(cfg, n_heads: int, block: int, device):
        """Token indices `[H, L]` of the blocks head `h` may attend from query block `block`, padded
        with invalid slots to the longest head's count (the pattern depends on the block alone)."""
        allowed = s2_block_mask(
            n_heads,
            torch.tensor([block]),
            torch.arange(block + 1),
            cfg.local_blocks,
            cfg.vert_stride,
            cfg.dense_heads,
        )[:, 0]  # fmt: skip  [H, block + 1]
        width = int(allowed.sum(1).max())
        # Allowed blocks first (ascending), then padding.
        order = torch.argsort((~allowed).to(torch.int8), dim=1, stable=True)[:, :width]
        slot_ok = torch.gather(allowed, 1, order)
        tokens = (order[..., None] * cfg.block_size + torch.arange(cfg.block_size)).flatten(1)
        valid = slot_ok.repeat_interleave(cfg.block_size, dim=1)
        return tokens.to(device), valid.to(device)

    def step(self, mixer, x, cos, sin, cache):
        q, k, v = mixer.qkv(x, cos, sin)
        cache.append(k, v)
        pos, cfg = cache.length - 1, mixer.core.cfg
        block = pos // cfg.block_size
        if cache.plan is None or cache.plan[0] != block:
            cache.plan = (block, *self._plan(cfg, mixer.n_heads, block, q.device))
        _, tokens, valid = cache.plan
        valid = valid & (tokens <= pos)
        b, groups = q.shape[0], mixer.n_heads // mixer.n_kv_heads
        # Head h reads kv head h // groups: gather per query head from its kv head's keys.
        kv_head = torch.arange(mixer.n_heads, device=q.device) // groups
        keys, values = cache.keys()
        index = tokens.clamp(max=pos)
        k_sel = keys[:, index, kv_head[:, None]]  # [B, H, L, D]
        v_sel = values[:, index, kv_head[:, None]]
        o = _attend(q[:, 0], k_sel, v_sel, valid.expand(b, -1, -1))
        return mixer.wo(o.flatten(2))

    def gather(self, mixer, cache, layout, group):
        _gather_kv(cache, group)


@register_decoder("N")
class NSADecoder(Decoder):
    def init_cache(self, mixer, batch):
        return NSACache()

    def prefill(self, mixer, x, cos, sin, layout, cache):
        q, k, v = mixer.qkv(x, cos, sin)
        gates = torch.sigmoid(mixer.gate(x)).view(*x.shape[:2], mixer.n_heads, 3)
        o = mixer.core(q, k, v, gates, mixer.compress_k, mixer.compress_v, layout)
        cache.append(k, v)
        if layout.is_full:
            cache.compressed.append(mixer.compress_k(k), mixer.compress_v(v))
        return mixer.wo(o.flatten(2))

    def gather(self, mixer, cache, layout, group):
        _gather_kv(cache, group)
        k, v = cache.keys()
        cache.compressed.append(mixer.compress_k(k), mixer.compress_v(v))

    def step(self, mixer, x, cos, sin, cache):
        c = mixer.core.cfg
        q, k, v = mixer.qkv(x, cos, sin)
        gates = torch.sigmoid(mixer.gate(x)).view(*x.shape[:2], mixer.n_heads, 3)
        cache.append(k, v)
        pos = cache.length - 1
        # The block [pos + 1 - cmp_block, pos] just completed: one more compressed token.
        first = pos + 1 - c.cmp_block
        if first >= 0 and first % c.cmp_stride == 0:
            window_k, window_v = cache.keys(first)
            cache.compressed.append(mixer.compress_k(window_k), mixer.compress_v(window_v))
        if cache.compressed.k is None:
            k_cmp = v_cmp = k.new_zeros(k.shape[0], 0, *k.shape[2:])
        else:
            k_cmp, v_cmp = cache.compressed.keys()
        o_cmp, lse = nsa_cmp_attn(q, k_cmp, v_cmp, c.cmp_block, c.cmp_stride, return_lse=True, q_offset=pos)
        block_idx = nsa_select_blocks(
            q, k_cmp, lse, c.cmp_block, c.cmp_stride, c.slc_block, c.slc_top, q_offset=pos
        )[:, 0]  # [B, H_kv, slc_top], -1 unused
        offsets = torch.arange(c.slc_block, device=q.device)
        tokens = (block_idx.long()[..., None] * c.slc_block + offsets).flatten(2)  # [B, H_kv, L]
        valid = (block_idx[..., None] >= 0).expand(-1, -1, -1, c.slc_block).flatten(2) & (tokens <= pos)
        keys, values = cache.keys()
        groups = mixer.n_heads // mixer.n_kv_heads
        k_sel = _gather_blocks(keys, tokens).repeat_interleave(groups, dim=1)
        v_sel = _gather_blocks(values, tokens).repeat_interleave(groups, dim=1)
        o_slc = _attend(q[:, 0], k_sel, v_sel, valid.repeat_interleave(groups, dim=1))
        start = max(0, pos - c.window + 1)
        win_k, win_v = cache.keys(start)
        o_win, _ = flash_attn_chunk(q, win_k, win_v, q_offset=pos, k_offset=start, window=c.window)
        return mixer.wo(mix_branches(gates, o_cmp, o_slc, o_win).flatten(2))


@register_decoder("L")
class LinearDecoder(Decoder):
    def init_cache(self, mixer, batch):
        return StateCache()

    @staticmethod
    def _inputs(mixer, x):
        b, t, _ = x.shape
        groups = mixer.n_heads // mixer.n_kv_heads
        q = mixer.wq(x).view(b, t, mixer.n_heads, mixer.head_dim)
        k = mixer.wk(x).view(b, t, mixer.n_kv_heads, mixer.head_dim).repeat_interleave(groups, dim=2)
        v = mixer.wv(x).view(b, t, mixer.n_kv_heads, mixer.head_dim).repeat_interleave(groups, dim=2)
        g = F.logsigmoid(mixer.w_g(x).float()) / mixer.gate_temp  # [B, T, H]
        return q, k, v, g

    @staticmethod
    def _output(mixer, x, o):
        b, t, _ = x.shape
        o = mixer.o_norm(o) * F.silu(mixer.w_og(x)).view(b, t, mixer.n_heads, mixer.head_dim)
        return mixer.wo(o.flatten(2))

    def prefill(self, mixer, x, cos, sin, layout, cache):
        q, k, v, g = self._inputs(mixer, x)
        if layout.is_full:
            o, cache.state = gated_linear_attn(q, k, v, g, output_final_state=True)
        else:
            # The core passes states between ranks; the cache keeps each local segment's own final
            # state (from zero) and total log-decay, which `gather` composes into the prompt's state.
            o = mixer.core(q, k, v, g, layout)
            cache.segments, local = [], 0
            for start, n in layout.segments:
                part = slice(local, local + n)
                _, state = gated_linear_attn(
                    q[:, part], k[:, part], v[:, part], g[:, part], output_final_state=True
                )
                cache.segments.append((start, state, g[:, part].sum(1)))
                local += n
        cache.length = x.shape[1]
        return self._output(mixer, x, o)

    def gather(self, mixer, cache, layout, group):
        from longctx.parallel.comm import all_gather_tensor as all_gather

        starts = torch.tensor(
            [s for s, _, _ in cache.segments], dtype=torch.float32, device=cache.segments[0][1].device
        )
        states = all_gather(torch.stack([s for _, s, _ in cache.segments]), group)  # [P, n_seg, B, H, Dk, Dv]
        decays = all_gather(torch.stack([d for _, _, d in cache.segments]), group)  # [P, n_seg, B, H]
        where = all_gather(starts, group).flatten()
        states, decays = states.flatten(0, 1), decays.flatten(0, 1)
        # S after segment c = exp(G_c) S + S_c, in the segments' global order.
        state = torch.zeros_like(states[0])
        for c in torch.argsort(where).tolist():
            state = torch.exp(decays[c])[..., None, None] * state + states[c]
        cache.state, cache.segments = state, None
        cache.length = layout.seq_len

    def step(self, mixer, x, cos, sin, cache):
        q, k, v, g = self._inputs(mixer, x)
        o, cache.state = gated_linear_attn_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], cache.state)
        cache.length += 1
        return self._output(mixer, x, o[:, None])


class DeltaCache:
    """G's fp32 state `[B, H, Dk, Dv]` and convolution window `[B, 3, C]`, constant in size."""

    def __init__(self):
        self.window = self.state = None
        self.pending = None  # after a context-parallel prefill, until `gather`
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.window, self.state) if t is not None)


@register_decoder("G")
class DeltaDecoder(Decoder):
    def init_cache(self, mixer, batch):
        return DeltaCache()

    def prefill(self, mixer, x, cos, sin, layout, cache):
        cache.length = x.shape[1]
        if layout.is_full:
            # Packed documents (layout.docs): the cache holds the last document's state and window.
            out, (cache.window, cache.state) = mixer.prefill(x, layout)
            return out
        if layout.docs is not None:
            raise ValueError(
                "a context-parallel prefill of packed documents is not supported for G layers (the "
                "gathered state would cross documents); prefill the documents in one process"
            )
        # The context-parallel core computes the outputs; `gather` rebuilds the prompt's state from
        # each local segment's inputs (kept until then: this rank's share of the prompt only).
        qkv, g, beta = mixer.gates(x)
        cache.pending, local = [], 0
        for start, n in layout.segments:
            part = slice(local, local + n)
            cache.pending.append((start, qkv[:, part], g[:, part], beta[:, part]))
            local += n
        return mixer(x, cos, sin, layout)

    def gather(self, mixer, cache, layout, group):
        """Compose the prompt's state from every segment's affine map `S_end = A S_start + B`
        (`longctx.parallel.delta`), each segment's convolution seeing the 3 inputs before it."""
        from longctx.parallel.comm import all_gather_tensor as all_gather

        width = mixer.q_conv.weight.shape[-1]
        halo = width - 1
        starts = [s for s, _, _, _ in cache.pending]
        if min(qkv.shape[1] for _, qkv, _, _ in cache.pending) < halo:
            raise ValueError(f"G layers need context-parallel prefill segments of at least {halo} tokens")
        tails = all_gather(torch.stack([qkv[:, -halo:] for _, qkv, _, _ in cache.pending]), group)
        where = all_gather(torch.tensor(starts, dtype=torch.float64, device=tails.device), group)
        sizes = [qkv.shape[1] for _, qkv, _, _ in cache.pending]
        lengths = all_gather(torch.tensor(sizes, dtype=torch.float64, device=tails.device), group)
        # The segment ending where this one starts supplies its halo.
        tail_at = {
            int(where[p, i] + lengths[p, i]): tails[p, i]
            for p in range(where.shape[0])
            for i in range(where.shape[1])
        }
        maps = []
        for start, qkv, g, beta in cache.pending:
            q, k, v = mixer.core.prepare(qkv, mixer.conv_weight(), tail_at.get(start))
            b, _, h, dk = q.shape
            dv = v.shape[-1]
            work = g.dtype
            v_aug = torch.cat([v, v.new_zeros(b, v.shape[1], h, dk)], dim=-1)
            eye = torch.eye(dk, dtype=work, device=q.device).expand(b, h, dk, dk)
            init = torch.cat([eye.new_zeros(b, h, dk, dv), eye], dim=-1)
            _, ab = gated_delta_rule(q, k, v_aug, g, beta, initial_state=init, output_final_state=True)
            maps.append(ab.to(work))  # [B | A]: [B, H, Dk, Dv + Dk]
        gathered = all_gather(torch.stack(maps), group).flatten(0, 1)
        order = torch.argsort(where.flatten()).tolist()
        state = torch.zeros_like(gathered[0][..., :dv])
        for c in order:
            state = gathered[c][..., dv:] @ state + gathered[c][..., :dv]
        last = order[-1]
        cache.state = state
        cache.window = tails.flatten(0, 1)[last]
        cache.pending = None
        cache.length = layout.seq_len

    def step(self, mixer, x, cos, sin, cache):
        out, (cache.window, cache.state) = mixer.step(x[:, 0], (cache.window, cache.state))
        cache.length += 1
        return out[:, None]


class ModelCache:
    """One cache per layer and the number of tokens they hold."""

    def __init__(self, layers: list):
        self.layers = layers
        self.length = 0

    @classmethod
    def empty(cls, model, batch: int) -> "ModelCache":
        return cls([decoder_for(layer.mixer).init_cache(layer.mixer, batch) for layer in model.layers])

    def nbytes_by_mixer(self, model) -> dict[str, int]:
        """Bytes held per mixer letter, summed over that letter's layers."""
        out: dict[str, int] = {}
        for layer, cache in zip(model.layers, self.layers):
            letter = type(layer.mixer).letter
            out[letter] = out.get(letter, 0) + cache.nbytes()
        return out


def _run_layers(model, tokens, cache: ModelCache, start: int, prefill: bool, layout=None) -> torch.Tensor:
    """The model over `tokens` (a prompt, a zigzag shard of one under `layout`, or one new token at
    position `start`), each layer through its decoder; the final-norm hidden state of the last token."""
    layout = layout or SeqLayout.full(tokens.shape[1])
    positions = layout.positions(tokens.device) + start
    cos, sin = rope_cos_sin(positions, model.rope_inv_freq, model.rope_mscale)
    h = model.tok_embeddings(tokens)
    for layer, layer_cache in zip(model.layers, cache.layers):
        decoder = decoder_for(layer.mixer)
        x = layer.attention_norm(h)
        if prefill:
            h = h + decoder.prefill(layer.mixer, x, cos, sin, layout, layer_cache)
        else:
            h = h + decoder.step(layer.mixer, x, cos, sin, layer_cache)
        h = h + layer.mlp(layer.mlp_norm(h))
    cache.length = start + layout.seq_len
    return model.norm(h[:, -1])


@torch.no_grad()
def prefill(model, tokens: torch.Tensor, cache: ModelCache) -> torch.Tensor:
    """Run the prompt `tokens` `[B, T]` through the training kernels into the empty `cache`; returns
    the logits `[B, vocab]` that predict the token after the prompt."""
    if cache.length:
        raise ValueError(f"prefill needs an empty cache, this one holds {cache.length} tokens")
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prefill needs tokens [B, T] with T >= 1, got shape {tuple(tokens.shape)}")
    # Only the last position's logits are needed: never [B, T, vocab].
    return model.output(_run_layers(model, tokens, cache, 0, prefill=True))


@torch.no_grad()
def decode_step(model, token: torch.Tensor, cache: ModelCache) -> torch.Tensor:
    """Feed one token per sequence (`token` `[B]`) at the next position; returns logits `[B, vocab]`."""
    if cache.length == 0:
        raise ValueError("decode_step needs a prefilled cache: call prefill(model, prompt, cache) first")
    return model.output(_run_layers(model, token.view(-1, 1), cache, cache.length, prefill=False))


def context_parallel_prefill(cp_rank: int, cp_size: int, group, block: int = 1):
    """A `prefill` for a model made context-parallel (`parallelize_model`): every rank of `group`
    passes the same prompt and runs its zigzag shard of the longest prefix that splits into `2 * cp_size`
    chunks of whole `block`-token blocks through the context-parallel cores; the caches are then gathered
    (each rank holds the whole prompt's) and the rest of the prompt is stepped through. Every rank
    returns the same logits and decodes on its own."""
    import torch.distributed as dist

    from longctx.parallel import zigzag_shard

    multiple = 2 * cp_size * block

    @torch.no_grad()
    def run(model, tokens: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        head = tokens.shape[1] // multiple * multiple
        if head == 0:
            return prefill(model, tokens, cache)
        layout = SeqLayout.zigzag(head, cp_rank, cp_size)
        hidden = _run_layers(model, zigzag_shard(tokens[:, :head], cp_rank, cp_size), cache, 0, True, layout)
        # The prompt's last token is the last of chunk 2P - 1, which rank 0 of the group holds.
        dist.broadcast(hidden, dist.get_global_rank(group, 0), group=group)
        for layer, layer_cache in zip(model.layers, cache.layers):
            decoder_for(layer.mixer).gather(layer.mixer, layer_cache, layout, group)
        logits = model.output(hidden)
        for t in range(head, tokens.shape[1]):
            logits = decode_step(model, tokens[:, t], cache)
        return logits

    return run
