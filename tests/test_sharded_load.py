"""The positioned-read safetensors reader of `train.init_from` (longctx.train.sharded_load) against
safetensors' own loader; the sharded loads themselves run under torchrun in tests/test_distributed.py
and tests/test_hf.py."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from longctx.train.sharded_load import SafetensorsFile, init_source


def test_read_rows_equals_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(7, 5, generator=g),
        "b16": torch.randn(6, 3, 2, generator=g).to(torch.bfloat16),
        "v": torch.randn(9, generator=g),
        "s": torch.tensor(3.5),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    want = load_file(str(path))
    st = SafetensorsFile(path)
    assert sorted(st.keys()) == sorted(tensors) and st.shape("b16") == [6, 3, 2]
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, start, stop in [("w", 2, 5), ("w", 0, 7), ("b16", 1, 4), ("v", 8, 9)]:
            # Same dtype: read straight into `out`; fp64: through a buffer of the slice.
            for dtype in (want[name].dtype, torch.float64):
                out = torch.full((stop - start, *want[name].shape[1:]), float("nan"), dtype=dtype)
                st.read_rows(name, start, stop, out, fd)
                assert torch.equal(out, want[name][start:stop].to(dtype)), (name, dtype)
        out = torch.empty(1)
        st.read_rows("s", 0, 1, out, fd)
        assert out.item() == 3.5
        # The check can fail: other rows are other values.
        out = torch.empty(3, 5)
        st.read_rows("w", 3, 6, out, fd)
        assert not torch.equal(out, want["w"][2:5])
        # Flat element ranges (a ZeRO-3 partition), across row boundaries, into a view of a longer buffer.
        for name, start, stop in [("w", 3, 21), ("w", 34, 35), ("b16", 5, 36), ("v", 0, 9)]:
            buf = torch.full((stop - start + 2,), float("nan"), dtype=want[name].dtype)
            st.read_elements(name, start, stop, buf.narrow(0, 0, stop - start), fd)
            assert torch.equal(buf[: stop - start], want[name].reshape(-1)[start:stop]), name
            assert buf[stop - start :].isnan().all()
    finally:
        os.close(fd)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="is truncated"):
        SafetensorsFile(truncated)
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ValueError, match="not a safetensors file"):
        SafetensorsFile(tmp_path / "bad.safetensors")


def test_init_source_names_what_a_path_is(tmp_path):
    assert init_source("hf:/some/dir") == ("hf", "/some/dir")
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    save_file({"tok_embeddings.weight": torch.zeros(2, 2)}, str(export / "model.safetensors"))
    assert init_source(str(export)) == ("export", str(export))
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(export / "model.safetensors"))
    with pytest.raises(ValueError, match=f"write train.init_from=hf:{export}"):
        init_source(str(export))
    with pytest.raises(ValueError, match="is not a checkpoint"):
        init_source(str(tmp_path))
