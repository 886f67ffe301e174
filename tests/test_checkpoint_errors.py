"""Bad model sources give one clear UserError naming the file and the problem; presets are exact."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import posttrain
from posttrain import PRESETS, UserError, param_counts
from posttrain.checkpoint import save_pretrained

TINY = posttrain.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                             num_kv_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)


@pytest.fixture
def tiny_dir(tmp_path):
    return save_pretrained(posttrain.build_model(TINY, seed=0), None, tmp_path / "tiny")


# The report's non-embedding parameter counts (Gemma 3 technical report, table 1).
REPORT_NON_EMBEDDING = {"1b": 698e6, "4b": 3209e6, "12b": 10_759e6, "27b": 25_600e6}


@pytest.mark.parametrize("name", sorted(REPORT_NON_EMBEDDING))
def test_preset_non_embedding_counts_match_report(name):
    counts = param_counts(PRESETS[name])
    ours, report = counts["non_embedding"], REPORT_NON_EMBEDDING[name]
    assert float(f"{ours:.3g}") == float(f"{report:.3g}"), (name, ours)
    assert counts["embedding"] == PRESETS[name].vocab_size * PRESETS[name].hidden_size


def test_preset_builds_on_meta_device():
    m = posttrain.build_model(PRESETS["27b"], device="meta")
    assert m.embed_tokens.weight.is_meta
    assert m.layers[5].self_attn.window is None and m.layers[0].self_attn.window == 1024
    assert m.layers[0].self_attn.scale == 168**-0.5


def test_round_trip_of_our_own_export(tiny_dir):
    model = posttrain.load_model(tiny_dir)
    ids = torch.randint(0, 64, (1, 9))
    again = posttrain.load_model(save_pretrained(model, None, tiny_dir.parent / "again"))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def test_a_frozen_embedding_is_stored_once_in_a_run(tmp_path):
    """save_pretrained(dedupe_within=run): the embedding gets a shard of its own; the second stage's equal
    shard is a hard link to the first's, its other weights are its own, and each directory loads alone
    (in transformers too) with its own logits."""
    first = posttrain.build_model(TINY, seed=0)
    second = posttrain.build_model(TINY, seed=1)
    second.embed_tokens.weight.data.copy_(first.embed_tokens.weight)  # frozen: the same embedding
    a = save_pretrained(first, None, tmp_path / "run" / "distill" / "final", dedupe_within=tmp_path / "run")
    b = save_pretrained(second, None, tmp_path / "run" / "policy" / "final", dedupe_within=tmp_path / "run")
    index = json.loads((b / "model.safetensors.index.json").read_text())["weight_map"]
    embed_file = index["model.embed_tokens.weight"]
    assert set(index.values()) - {embed_file} and list(index.values()).count(embed_file) == 1
    assert (a / embed_file).stat().st_ino == (b / embed_file).stat().st_ino  # stored once
    rest = next(f for f in set(index.values()) if f != embed_file)
    assert (a / rest).stat().st_ino != (b / rest).stat().st_ino
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        for model, path in ((first, a), (second, b)):
            assert torch.equal(posttrain.load_model(path)(ids), model(ids))
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(b, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, second(ids), rtol=1e-4, atol=1e-4)


def test_missing_path():
    with pytest.raises(UserError, match="does not exist.*gemma3-270m"):
        posttrain.load_model("/nonexistent/gemma")


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        posttrain.load_model(tmp_path)


def test_truncated_safetensors(tiny_dir):
    f = tiny_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.safetensors.*truncated or corrupt"):
        posttrain.load_model(tiny_dir)


def test_config_of_another_architecture(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="model_type 'llama'.*not Gemma 3"):
        posttrain.load_model(tiny_dir)


def test_mis_shaped_tensor(tiny_dir):
    state = load_file(tiny_dir / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(50, 32)
    save_file(state, tiny_dir / "model.safetensors")
    with pytest.raises(UserError, match=r"'layers.1.mlp.up_proj.weight' has shape \(50, 32\).*needs \(48, 32\)"):
        posttrain.load_model(tiny_dir)


def test_missing_and_unexpected_tensors(tiny_dir):
    state = load_file(tiny_dir / "model.safetensors")
    del state["model.layers.0.self_attn.k_norm.weight"]
    save_file(state, tiny_dir / "model.safetensors")
    with pytest.raises(UserError, match="missing tensors: 'layers.0.self_attn.k_norm.weight'"):
        posttrain.load_model(tiny_dir)
    state["model.layers.0.self_attn.k_norm.weight"] = torch.zeros(8)
    state["model.layers.0.self_attn.bias"] = torch.zeros(8)
    save_file(state, tiny_dir / "model.safetensors")
    with pytest.raises(UserError, match="unexpected tensors.*'layers.0.self_attn.bias'"):
        posttrain.load_model(tiny_dir)


def test_unsupported_config_feature(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["final_logit_softcapping"] = 30.0
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="final_logit_softcapping=30.0 is not supported"):
        posttrain.read_config(tiny_dir)


def test_sharded_index_naming_missing_shard(tiny_dir, tmp_path):
    model = posttrain.load_model(tiny_dir)
    out = save_pretrained(model, None, tmp_path / "sharded", max_shard_bytes=5_000)
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(UserError, match=f"missing.*{shard.name}"):
        posttrain.load_model(out)


def test_truncated_gguf(tmp_path):
    from posttrain.embedded import embedded_gguf_path

    bad = tmp_path / "broken.gguf"
    with open(embedded_gguf_path(), "rb") as f:
        bad.write_bytes(f.read(3_000_000))  # header and metadata intact, tensor data cut
    with pytest.raises(UserError, match="broken.gguf.*truncated or corrupt"):
        posttrain.load_model(bad)
    bad.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(UserError, match="broken.gguf"):
        posttrain.read_config(bad)


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match="neither a directory nor a .gguf file"):
        posttrain.load_model(f)


def test_dtype_and_device_are_applied(tiny_dir):
    m = posttrain.load_model(tiny_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.layers[0].self_attn.inv_freq.dtype == torch.float32  # RoPE table stays float32
    assert not m.training


def test_copied_directory_is_independent(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "copy")
    assert posttrain.read_config(tmp_path / "copy") == TINY


def test_train_reports_a_broken_checkpoint_in_one_line(tiny_dir, tmp_path, capsys):
    """Through the CLI a bad checkpoint is one `error:` line and exit status 2, no traceback."""
    import train

    f = tiny_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    status = train.main([
        "recipe=smoke", f"run_dir={tmp_path}", f"model.student.source={tiny_dir}", "model.student.preset=null",
        "model.student.arch={}", "model.teacher=null", "stages=[export]",
    ])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("error:") == 1 and "model.safetensors" in err and "Traceback" not in err


def test_library_never_imports_transformers():
    """transformers is a test-only reference: importing and using the library must not load it."""
    import subprocess
    import sys

    code = (
        "import sys, torch, posttrain\n"
        "from posttrain import checkpoint, tokenizer, oracle, plan, recipe, config, hf_config, gguf_io\n"
        "m = posttrain.build_model(posttrain.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,"
        " num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=4))\n"
        "m(torch.tensor([[1, 2, 3]]))\n"
        "assert 'transformers' not in sys.modules, 'posttrain imported transformers'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
