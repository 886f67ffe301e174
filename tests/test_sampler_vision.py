"""The sampler with images in prompts: greedy output equals transformers' generate on a tiny
multimodal model, returned log-probs equal a full forward, prefill chunks never split an image,
and a prompt's images are encoded once however many samples it gets."""

import pytest
import torch
from test_vision_parity import IMG, hf_multimodal, pixels, sequence

import posttrain
from posttrain.sampler import Sampler

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=[3, 32])  # a window shorter than an image, and one longer
def models(tmp_path_factory, request):
    path = tmp_path_factory.mktemp("mm")
    hf = hf_multimodal(path, sliding_window=request.param, mm_tokens=16, layers=8)  # layer 5 global
    return hf, posttrain.load_model(path)


PROMPTS = [sequence([2, 10, "img", 12, 13], mm_tokens=16), sequence([2, "img", 20, "img", 21, 22], mm_tokens=16)]
IMAGES = [pixels(1, seed=7), pixels(2, seed=8)]


@pytest.mark.parametrize("chunk", [512, 5])  # 5: chunk ends fall inside images, which must move them
def test_greedy_equals_transformers_generate(models, chunk):
    hf, ours = models
    sampler = Sampler(ours, prefill_chunk=chunk)
    out = sampler.generate(PROMPTS, images=IMAGES, max_new_tokens=6, temperature=0.0, stop_token_ids=[])
    for prompt, pix, got in zip(PROMPTS, IMAGES, out):
        ids = torch.tensor([prompt])
        ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix,
                          token_type_ids=(ids == IMG).long(), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert got[0].tokens == ref[0, len(prompt):].tolist()


def test_logprobs_equal_a_full_forward(models):
    _, ours = models
    out = Sampler(ours, prefill_chunk=7).generate(PROMPTS, images=IMAGES, n=2, max_new_tokens=5, temperature=1.0,
                                                  seed=0, stop_token_ids=[])
    for prompt, pix, group in zip(PROMPTS, IMAGES, out):
        for c in group:
            ids = torch.tensor([prompt + c.tokens])
            with torch.no_grad():
                lp = ours(ids, pixel_values=pix).log_softmax(-1)[0, len(prompt) - 1:-1]
            ref = lp.gather(-1, torch.tensor(c.tokens)[:, None]).squeeze(-1)
            assert (torch.tensor(c.logprobs) - ref).abs().max().item() < 1e-4


def test_images_are_encoded_once_per_prompt(models):
    _, ours = models
    calls = []
    hook = ours.vision_tower.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        Sampler(ours).generate(PROMPTS, images=IMAGES, n=4, max_new_tokens=2, seed=0)
    finally:
        hook.remove()
    assert calls == [1, 2]  # one call per prompt, with that prompt's images, not one per sample


def test_image_tokens_without_images_are_an_error(models):
    _, ours = models
    with pytest.raises(ValueError, match="no images were given"):
        Sampler(ours).generate(PROMPTS, max_new_tokens=2)
