"""The parameters a converted layer (S/N/L/G replacing a checkpoint's dense attention) has that the
dense layer lacks, started as `longctx.hf` describes."""

import torch

# Gate bias of a converted N layer: sigmoid(4) = 0.982 on selection, sigmoid(-4) = 0.018 elsewhere.
NSA_GATE_BIAS = 4.0


@torch.no_grad()
def init_converted(model, new: list[str]) -> None:
    """Start the parameters in `new` (of converted layers) as the module docstring says."""
    new = set(new)
    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}.mixer."
        if layer.letter == "N" and f"{prefix}gate.weight" in new:
            mixer = layer.mixer
            mixer.gate.weight.zero_()
            bias = mixer.gate.bias.view(mixer.n_heads, 3)
            bias.fill_(-NSA_GATE_BIAS)
            bias[:, 1] = NSA_GATE_BIAS
            mixer.compress_k.w2.zero_()
            mixer.compress_v.w2.zero_()
        if layer.letter == "G" and f"{prefix}q_conv.weight" in new:
            for conv in (layer.mixer.q_conv, layer.mixer.k_conv, layer.mixer.v_conv):
                conv.weight.zero_()
                conv.weight[..., -1] = 1.0
