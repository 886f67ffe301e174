"""The sampler on the real Gemma 3 270M against transformers `generate` and a full forward."""

import pytest
import torch

import posttrain
from posttrain.checkpoint import embedded_hf_dir
from posttrain.sampler import Sampler

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

TEXT = (
    "The history of mathematics deals with the origin of discoveries in mathematics and the mathematical "
    "methods and notation of the past. Before the modern age and the worldwide spread of knowledge, written "
    "examples of new mathematical developments have come to light only in a few locales. From 3000 BC the "
    "Mesopotamian states of Sumer, Akkad and Assyria, followed closely by Ancient Egypt and the Levantine "
    "state of Ebla began using arithmetic, algebra and geometry for purposes of taxation, commerce, trade "
    "and also in the patterns in nature, the field of astronomy and to record time and formulate calendars. "
)
LENGTHS = (12, 70, 150, 230, 310, 390, 470, 545)  # 8 prompts; the longest plus 80 new tokens passes 600
NEW = 80


@pytest.fixture(scope="module")
def model():
    return posttrain.load_model("gemma3-270m")


@pytest.fixture(scope="module")
def prompts():
    tok = posttrain.load_tokenizer("gemma3-270m")
    ids = tok.encode(TEXT * 6, add_bos=True)
    return [ids[:n] for n in LENGTHS]


@pytest.fixture(scope="module")
def ours(model, prompts):
    return Sampler(model).generate(prompts, max_new_tokens=NEW, temperature=0, stop_token_ids=[])


def test_greedy_matches_transformers_generate_past_the_window(ours, prompts):
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        embedded_hf_dir(), dtype=torch.float32, attn_implementation="eager").eval()
    width = max(LENGTHS)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # left padding with <pad>
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                          do_sample=False, pad_token_id=0)
    theirs = out[:, width:].tolist()
    assert max(LENGTHS) + NEW > 600 and max(LENGTHS) > 512  # the sliding layers' ring wraps
    for i, (group, ref) in enumerate(zip(ours, theirs)):
        assert group[0].tokens == ref, f"prompt {i} (length {LENGTHS[i]}) diverges"


def test_logprobs_equal_full_forward(model, ours, prompts):
    worst = 0.0
    for prompt, (c,) in zip(prompts, ours):
        seq = torch.tensor([prompt + c.tokens])
        with torch.no_grad():
            hidden = model.hidden_states(seq)[0, len(prompt) - 1:-1]
            ref = model.logits(hidden).float().log_softmax(-1).gather(-1, torch.tensor(c.tokens)[:, None])
        worst = max(worst, (ref.squeeze(-1) - torch.tensor(c.logprobs)).abs().max().item())
    print(f"max |sampler log-prob - full forward log-prob| = {worst:.2e}")
    assert worst <= 1e-4
