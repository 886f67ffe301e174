"""The real Gemma 3 270M (the embedded GGUF) against transformers' own GGUF loading."""

import pytest
import torch

import posttrain
from posttrain.checkpoint import embedded_hf_dir
from posttrain.embedded import embedded_gguf_path
from posttrain.oracle import greedy_generate

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def ours():
    return posttrain.load_model("gemma3-270m")


@pytest.fixture(scope="module")
def tokenizer():
    return posttrain.load_tokenizer("gemma3-270m")


@pytest.fixture(scope="module")
def hf_gguf():
    path = embedded_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()


def test_embedded_architecture_is_the_270m_preset(ours):
    assert ours.config == posttrain.PRESETS["270m"].with_(rms_norm_eps=ours.config.rms_norm_eps)
    assert abs(ours.config.rms_norm_eps - 1e-6) < 1e-12  # GGUF stores it as float32


def test_logits_match_transformers_gguf_loading(ours, tokenizer, hf_gguf):
    text = ("Gemma 3 models are distilled from a larger teacher. In 2025, the 270M variant was released "
            "for on-device use; its vocabulary has 262,144 entries.")
    ids = torch.tensor([tokenizer.encode(text, add_bos=True)])
    with torch.no_grad():
        diff = (ours(ids) - hf_gguf(ids).logits).abs().max().item()
    print(f"max abs logit difference vs transformers GGUF loading: {diff:.2e} over {ids.shape[1]} tokens")
    assert diff <= 1e-3


def test_long_sequence_past_the_window_matches(ours, hf_gguf):
    ids = torch.randint(3, 50_000, (1, 600), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = 2
    with torch.no_grad():
        diff = (ours(ids) - hf_gguf(ids).logits).abs().max().item()
    assert diff <= 1e-3


def test_same_20_greedy_tokens(ours, tokenizer, hf_gguf):
    prompt = tokenizer.encode(PROMPT, add_bos=True)
    mine = greedy_generate(ours, prompt, max_new_tokens=20)
    with torch.no_grad():
        ref = hf_gguf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20)
    theirs = ref[0, len(prompt):].tolist()
    print(f"{PROMPT!r} -> {tokenizer.decode(mine)!r}")
    assert mine == theirs
    assert len(mine) == 20


def test_cached_embedded_directory_round_trips_through_transformers(ours, hf_gguf):
    """The embedded model's cache is our save_pretrained output: transformers loads it with the
    same weights as its own GGUF loading (so the same logits), and ours agree within float32 noise."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        embedded_hf_dir(), dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(3, 50_000, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exported = hf(ids).logits
        assert (exported - hf_gguf(ids).logits).abs().max().item() <= 1e-5
        assert (ours(ids) - exported).abs().max().item() <= 1e-3
    tok = transformers.AutoTokenizer.from_pretrained(embedded_hf_dir())
    assert tok.encode(PROMPT) == posttrain.load_tokenizer("gemma3-270m").encode(PROMPT, add_bos=True)


def test_loading_from_gguf_file_equals_embedded(ours):
    direct = posttrain.load_model(embedded_gguf_path())
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563]])
    with torch.no_grad():
        assert torch.equal(direct(ids), ours(ids))


def test_logits_match_at_positions_up_to_32767(ours, hf_gguf):
    """The 270M's longest context: 600 tokens (past the 512 window) ending at position 32,767."""
    ids = torch.randint(3, 50_000, (1, 600), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(32_768 - 600, 32_768)[None]
    with torch.no_grad():
        diff = (ours(ids, positions=positions) - hf_gguf(ids, position_ids=positions).logits).abs().max().item()
    print(f"max abs logit difference at positions 32,168..32,767: {diff:.2e}")
    assert diff <= 1e-3
