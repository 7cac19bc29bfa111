"""`longctx check`: every Triton kernel against the PyTorch reference, on this machine's GPU.

    longctx check                     # or: python -m longctx.kernels.check
    longctx check --ops flash s2      # a subset

For each op and shape (GQA, sliding windows, context-parallel offsets and block ids, head dims 64 and
128) it runs the forward and backward in bf16 through the kernels and through the reference, and
compares both with the reference in fp64 on the same (bf16-rounded) inputs. The bound is derived from
the reference's own bf16 error: `max(4 x error of the reference run on bf16 inputs, 2^-7)`, errors
measured as the largest absolute difference over the largest absolute value of the fp64 result. It
prints a table (op, shape, tensor, error, bound, pass) and exits 1 on any failure. It records which
ops passed on this device in the check cache (`~/.cache/longctx/check.json`, `LONGCTX_CHECK_CACHE`
overrides), which `train.kernels=auto` reads to run a failed op on `flex` or the reference instead.

On CPU the interpreter runs in fp32 (numpy has no bf16), with bounds from the fp32 reference's error.
Kernels run with their default configs (`LONGCTX_TUNE=off` unless set): compiling every tuning
candidate would take minutes; `python -m longctx.kernels.aot` compiles them all. Without a GPU it says
so and runs the Triton interpreter on tiny shapes instead (in a subprocess with `TRITON_INTERPRET=1`).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

OPS = ("flash", "s2", "nsa", "gla")
# Smallest bound per dtype (where the reference's own error is smaller still, e.g. fp32).
FLOOR = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 1e-4}
FACTOR = 4.0


def _err(x: torch.Tensor, truth: torch.Tensor) -> float:
    x, truth = x.double(), truth.double()
    finite = torch.isfinite(truth)
    if not torch.equal(torch.isfinite(x), finite):
        return float("inf")
    x, truth = x[finite], truth[finite]
    if truth.numel() == 0:
        return 0.0
    return float((x - truth).abs().max() / truth.abs().max().clamp_min(1e-12))


def _run(fn, inputs, dtype, backend, cotangents):
    """Outputs and input gradients of `fn` on `inputs` cast to `dtype` under `backend`."""
    import longctx.kernels as K

    xs = [x.to(dtype).detach().requires_grad_(x.is_floating_point() and x.requires_grad) for x in inputs]
    with K.backend(backend):
        outs = fn(*xs)
        live = [(o, c) for o, c in zip(outs, cotangents) if o is not None and o.requires_grad]
        params = [x for x in xs if x.requires_grad]
        grads = torch.autograd.grad(
            [(o.float() * c.float()).masked_fill(~torch.isfinite(o), 0).sum() for o, c in live], params
        )
    return [o.detach() for o in outs], list(grads)


DTYPE = torch.bfloat16


def compare(op, shape, fn, inputs, out_names, grad_names):
    """Rows `(op, shape, tensor, kernel error, bound, ok)` for one case."""
    dtype = DTYPE
    # The reference inputs are the bf16-rounded ones: every path starts from the same numbers.
    inputs = [x.to(dtype).to(x.dtype).requires_grad_(x.requires_grad) if x.is_floating_point() else x
              for x in inputs]  # fmt: skip
    with torch.no_grad():
        probe = fn(*[x.detach() for x in inputs])
    cotangents = [None if o is None else torch.randn_like(o, dtype=torch.float64) for o in probe]
    truth, truth_grads = _run(fn, inputs, torch.float64, "naive", cotangents)
    ref, ref_grads = _run(fn, inputs, dtype, "naive", cotangents)
    kern, kern_grads = _run(fn, inputs, dtype, "triton", cotangents)
    rows = []
    for name, t, r, k in zip(out_names + grad_names, truth + truth_grads, ref + ref_grads, kern + kern_grads):
        if t is None:
            continue
        bound = max(FACTOR * _err(r, t), FLOOR[dtype])
        error = _err(k, t)
        rows.append((op, shape, name, error, bound, error <= bound))
    return rows


def _qkv(b, t, h, h_kv, d, device):
    q = torch.randn(b, t, h, d, device=device, requires_grad=True)
    k = torch.randn(b, t, h_kv, d, device=device, requires_grad=True)
    v = torch.randn(b, t, h_kv, d, device=device, requires_grad=True)
    return q, k, v


def check_flash(device, tiny):
    import longctx.kernels as K

    t = 64 if tiny else 1024
    rows = []
    w = t // 4

    def chunk(q, k, v):
        return K.flash_attn_chunk(q, k, v, q_offset=t, k_offset=t // 2, window=w)

    for d in (32,) if tiny else (64, 128):
        q, k, v = _qkv(1, t, 8, 2, d, device)
        rows += compare("flash", f"T={t} H=8/2 D={d} causal", lambda q, k, v: (K.flash_attn(q, k, v),),
                        [q, k, v], ["o"], ["dq", "dk", "dv"])  # fmt: skip
        rows += compare("flash", f"T={t} D={d} window={w} q_off={t} k_off={t // 2}", chunk, [q, k, v],
                        ["o", "lse"], ["dq", "dk", "dv"])  # fmt: skip
    return rows


def check_s2(device, tiny):
    import longctx.kernels as K

    bs = 16 if tiny else 64
    n = 4 if tiny else 16
    rows = []
    # A context-parallel shard: query blocks 2n..3n-1 against the earlier key blocks n..2n-1.
    q_ids = torch.arange(2 * n, 3 * n)
    k_ids = torch.arange(n, 2 * n)

    def s2(q, k, v):
        return K.s2_attn(q, k, v, block_size=bs, local_blocks=2, vert_stride=4, dense_heads=1,
                         return_lse=True, q_block_ids=q_ids, k_block_ids=k_ids)  # fmt: skip

    for d in (32,) if tiny else (64, 128):
        q, k, v = _qkv(1, n * bs, 8, 2, d, device)
        rows += compare("s2", f"T={n * bs} H=8/2 D={d} bs={bs} cp-ids", s2, [q, k, v], ["o", "lse"],
                        ["dq", "dk", "dv"])  # fmt: skip
    return rows


def check_nsa(device, tiny):
    import longctx.kernels as K
    from longctx.kernels.nsa.naive import select_blocks_ref

    t = 128 if tiny else 2048
    d = 32 if tiny else 128
    cmp_block, cmp_stride, slc_block, top = (32, 16, 32, 4) if tiny else (32, 16, 64, 16)
    q, k, v = _qkv(1, t, 16, 1, d, device)
    t_c = (t - cmp_block) // cmp_stride + 1
    k_cmp, v_cmp = (torch.randn(1, t_c, 1, d, device=device, requires_grad=True) for _ in range(2))
    off = t  # a later context-parallel shard

    def cmp(q, k_cmp, v_cmp):
        return K.nsa_cmp_attn(q, k_cmp, v_cmp, cmp_block, cmp_stride, return_lse=True, q_offset=off)

    rows = compare("nsa_cmp", f"T={t} H=16/1 D={d} q_off={off}", cmp, [q, k_cmp, v_cmp], ["o", "lse"],
                   ["dq", "dk_cmp", "dv_cmp"])  # fmt: skip
    # Selection: the kernel's choice against the reference's on the same bf16 inputs (ties aside).
    qb, kb = q.detach().to(DTYPE), k_cmp.detach().to(DTYPE)
    with K.backend("naive"):
        _, lse = K.nsa_cmp_attn(qb, kb, kb, cmp_block, cmp_stride, return_lse=True, q_offset=off)
    with K.backend("triton"):
        idx = K.nsa_select_blocks(qb, kb, lse, cmp_block, cmp_stride, slc_block, top, q_offset=off)
    ref_idx = select_blocks_ref(qb.float(), kb.float(), lse, cmp_block, cmp_stride, slc_block, top,
                                qb.shape[-1] ** -0.5, off)  # fmt: skip
    differ = float((idx.long().sort(-1).values != ref_idx.long().sort(-1).values).float().mean())
    rows.append(("nsa_select_blocks", f"T={t} H=16/1 D={d} top={top}", "idx (fraction differing)", differ,
                 0.01, differ <= 0.01))  # fmt: skip

    def sel(q, k, v):
        return K.nsa_select_attn(q, k, v, ref_idx, block_size=slc_block, return_lse=True, q_offset=off,
                                 k_offset=0)  # fmt: skip

    k2, v2 = (torch.randn(1, 2 * t, 1, d, device=device, requires_grad=True) for _ in range(2))
    rows += compare("nsa_select", f"T={t} H=16/1 D={d} q_off={off}", sel, [q, k2, v2], ["o", "lse"],
                    ["dq", "dk", "dv"])  # fmt: skip
    return rows


def check_gla(device, tiny):
    import longctx.kernels as K

    t = 128 if tiny else 2048
    rows = []
    for d in (32,) if tiny else (64, 128):
        q, k, v = _qkv(1, t, 4, 4, d, device)
        q = (q * d**-0.5).detach().requires_grad_()
        g = torch.nn.functional.logsigmoid(torch.randn(1, t, 4, device=device) + 3).requires_grad_()
        h0 = torch.randn(1, 4, d, d, device=device, requires_grad=True)

        def gla(q, k, v, g, h0):
            return K.gated_linear_attn(q, k, v, g.float(), initial_state=h0.float(), output_final_state=True)

        rows += compare("gla", f"T={t} H=4 D={d} h0", gla, [q, k, v, g, h0], ["o", "final_state"],
                        ["dq", "dk", "dv", "dg", "dh0"])  # fmt: skip
    return rows


CHECKS = {"flash": check_flash, "s2": check_s2, "nsa": check_nsa, "gla": check_gla}


def print_table(rows) -> None:
    print(f"{'op':<18} {'shape':<40} {'tensor':<24} {'max error':>10} {'bound':>10}  pass")
    for op, shape, name, error, bound, ok in rows:
        print(f"{op:<18} {shape:<40} {name:<24} {error:>10.2e} {bound:>10.2e}  {'yes' if ok else 'NO'}")


def write_cache(device, rows) -> None:
    """Record per op whether every row passed, under this device's key, keeping other devices' entries."""
    import longctx.kernels.common  # noqa: F401

    backend_mod = sys.modules["longctx.kernels.common.backend"]  # the module (the package exports a function)
    path = backend_mod.check_cache_path()
    ops = {}
    for op, *_rest, ok in rows:
        family = op.split("_")[0].split(".")[0]
        ops[family] = ops.get(family, True) and bool(ok)
    data = json.loads(path.read_text()) if path.exists() else {}
    entry = data.setdefault(backend_mod.device_key(device), {"ops": {}})
    entry["ops"].update(ops)
    entry["torch"], entry["time"] = torch.__version__, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
    backend_mod.failed_ops.cache_clear()
    print(f"check: results recorded in {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="longctx check", description=__doc__.split("\n")[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("longctx check: no GPU here; running the Triton interpreter on tiny shapes instead (it "
              "checks the numbers, not the compiled code: see python -m longctx.kernels.aot)")  # fmt: skip
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "longctx.kernels.check", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(cmd, env=env).returncode
    global DTYPE
    os.environ.setdefault("LONGCTX_TUNE", "off")
    device = "cuda" if cuda else "cpu"
    # The interpreter computes with numpy, which has no bf16: on CPU the check runs in fp32.
    DTYPE = torch.bfloat16 if cuda else torch.float32
    where = torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter"
    print(f"longctx check on {where}: ops {', '.join(args.ops)}, {DTYPE}, fwd + bwd")
    torch.manual_seed(0)
    start = time.time()
    rows = []
    for op in args.ops:
        rows += CHECKS[op](device, tiny=not cuda)
    print_table(rows)
    failed = [r for r in rows if not r[5]]
    write_cache(device, rows)
    print(f"check: {len(rows) - len(failed)}/{len(rows)} passed in {time.time() - start:.0f} s"
          f"{' (interpreter)' if not cuda else ''}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
