"""Q4_0 GGUF export (posttrain/gguf_export.py): the gguf reader sees Q4_0 linear weights, an F16
embedding and the Gemma 3 tokenizer; our loader and transformers' GGUF loading compute the logits of
the fake-quantised model the file stores (q4_0_reference)."""
from __future__ import annotations

import gguf
import pytest
import torch

import posttrain
from posttrain.errors import UserError
from posttrain.gguf_export import q4_0_reference, write_gguf
from posttrain.model import GemmaConfig, build_model

TINY = GemmaConfig(num_layers=3, hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=1, head_dim=32,
                   query_pre_attn_scalar=32, sliding_window=8)


def test_tiny_export_reads_back_as_q4_0_and_gives_the_fake_quantised_logits(tmp_path):
    model = build_model(TINY, seed=0).eval()
    info = write_gguf(model, tmp_path / "tiny.gguf")
    assert info["linear_bits_per_weight"] == 4.5 and info["bytes"] == (tmp_path / "tiny.gguf").stat().st_size
    reader = gguf.GGUFReader(str(tmp_path / "tiny.gguf"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    q4 = [n for n, t in types.items() if t == gguf.GGMLQuantizationType.Q4_0]
    assert len(q4) == 7 * TINY.num_layers and all(n.startswith("blk.") for n in q4)
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 262_144

    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    back = posttrain.load_model(tmp_path / "tiny.gguf").eval()
    with torch.no_grad():
        got, want, full = back(ids), q4_0_reference(model)(ids), model(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - full).abs().max() > 1e-3  # the file is quantised


def test_unknown_embedding_type_is_one_error(tmp_path):
    with pytest.raises(UserError, match="f16, f32, q4_0"):
        write_gguf(build_model(TINY, seed=0), tmp_path / "x.gguf", embedding="int8")


@pytest.mark.slow
def test_real_270m_q4_0_gguf_loads_in_transformers_with_our_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = posttrain.load_model("gemma3-270m").eval()
    info = write_gguf(model, tmp_path / "gemma3-270m-q4_0.gguf")
    c = model.config
    linear = c.num_layers * (c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
                             + 3 * c.hidden_size * c.intermediate_size)
    expected = 2 * c.vocab_size * c.hidden_size + linear * 18 // 32  # F16 embedding, Q4_0 linear weights
    assert expected < info["bytes"] < expected + 8e6, info  # plus norms, the tokenizer and the header
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="gemma3-270m-q4_0.gguf",
                                                           dtype=torch.float32, attn_implementation="eager").eval()
    ours = posttrain.load_model(tmp_path / "gemma3-270m-q4_0.gguf").eval()
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563, 9079, 236761, 108, 818, 5279, 529, 5213]])
    with torch.no_grad():
        want = q4_0_reference(model)(ids)
        torch.testing.assert_close(ours(ids), want, rtol=0, atol=1e-4)
        torch.testing.assert_close(hf(ids).logits, want, rtol=0, atol=1e-4)
