"""`python -m posttrain.generate` streams exactly the text of the sampler's tokens."""

import pytest

import posttrain
from posttrain.generate import main
from posttrain.sampler import Sampler


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    cfg = posttrain.PRESETS["270m"].with_(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                                          num_kv_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=8)
    model = posttrain.build_model(cfg, seed=0)
    return posttrain.save_pretrained(model, posttrain.load_tokenizer("gemma3-270m"), tmp_path_factory.mktemp("m"))


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_text_equals_decoded_tokens(tiny_dir, capsys, chat):
    prompt = "Hello there"
    args = ["--model", str(tiny_dir), "--prompt", prompt, "--max-new-tokens", "12"] + (["--chat"] if chat else [])
    assert main(args) == 0
    printed = capsys.readouterr().out
    tok = posttrain.load_tokenizer(tiny_dir)
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True).ids
    else:
        ids = tok.encode(prompt, add_bos=True)
    c = Sampler(posttrain.load_model(tiny_dir)).generate([ids], max_new_tokens=12, temperature=0)[0][0]
    expected = ("" if chat else prompt) + tok.decode(c.tokens, skip_special_tokens=True)
    assert printed.startswith(expected)
    assert f"[{len(c.tokens)} tokens, finish: {c.finish_reason}]" in printed


def test_bad_model_path_is_one_line(capsys):
    assert main(["--model", "/nonexistent", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
