"""Images in, against transformers: pixel values (bit-identical to Gemma3ImageProcessorPil with the
released models' preprocessor settings), Pan & Scan crop counts and pixels, and prompt ids and
token_type_ids equal to Gemma3Processor's; loss masks and the errors for bad image rows."""

import glob
import io

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from posttrain.errors import UserError
from posttrain.images import ImageConfig, encode_chat, load_image, pan_and_scan_crops, preprocess, row_images
from posttrain.tokenizer import BOI_TOKEN_ID, EOI_TOKEN_ID, IMAGE_TOKEN_ID, load_tokenizer

transformers = pytest.importorskip("transformers")

GRACE_HOPPER = glob.glob(matplotlib.get_data_path() + "/**/grace_hopper.jpg", recursive=True)[0]
PAS = dict(pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)


def hf_image_processor():
    # the hub's preprocessor_config.json for every Gemma 3 size; the Pan & Scan knobs are the processor's defaults
    return transformers.Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, resample=2,
                                                rescale_factor=1 / 255, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                                do_convert_rgb=True, **PAS)


def synthetic(w, h, mode="RGB", seed=0):
    rng = np.random.RandomState(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (h, w, channels) if channels else (h, w)
    return Image.fromarray(rng.randint(0, 256, shape, dtype=np.uint8), mode)


IMAGES = {
    "grace_hopper": lambda: Image.open(GRACE_HOPPER),
    "rgba_wide": lambda: synthetic(1536, 600, "RGBA"),
    "grey_tall": lambda: synthetic(300, 900, "L", seed=1),
    "palette": lambda: synthetic(700, 400, seed=2).convert("P"),
    "small": lambda: synthetic(20, 31, seed=3),
}


@pytest.mark.parametrize("pan_and_scan", [False, True])
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_pixel_values_bit_identical(name, pan_and_scan):
    image = IMAGES[name]()
    ref = hf_image_processor()(images=[image], return_tensors="pt", do_pan_and_scan=pan_and_scan)
    ours, crops = preprocess([load_image(image, name)], ImageConfig(pan_and_scan=pan_and_scan))
    assert crops == ref["num_crops"].tolist()
    assert ours.dtype == torch.float32 and torch.equal(ours, ref["pixel_values"])


# ratio 1.2 at 512 falls between 614 and 615; a crop of 256 between 511 and 510 (2 crops) or 257 and 255 rows
SIZES = [(1536, 600), (542, 130), (640, 427), (600, 1536), (427, 640), (512, 512), (611, 512), (614, 512),
         (615, 512), (512, 615), (511, 300), (512, 300), (510, 300), (300, 510), (2000, 257), (2000, 255),
         (1000, 300), (4000, 600), (300, 1300), (100, 4000)]
KNOBS = ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate")
SETTINGS = [PAS, dict(zip(KNOBS, (128, 8, 1.0))), dict(zip(KNOBS, (300, 2, 1.5)))]


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_pan_and_scan_crops_equal_transformers_on_a_grid(setting):
    hf, knobs = hf_image_processor(), SETTINGS[setting]
    counts = set()
    for w, h in SIZES:
        image = synthetic(w, h, seed=w + h)
        arr = np.asarray(image).transpose(2, 0, 1)  # the array form transformers crops
        ref = hf.pan_and_scan(arr, **knobs)
        ours = pan_and_scan_crops(image, ImageConfig(pan_and_scan=True, **knobs))
        assert len(ours) == len(ref), (w, h)
        counts.add(len(ref))
        for a, b in zip(ours, ref):
            assert np.array_equal(np.asarray(a).transpose(2, 0, 1), b), (w, h)
    assert 0 in counts and len(counts) >= 2  # not vacuous: some images get no crops, others do
    assert len(pan_and_scan_crops(synthetic(1536, 600), ImageConfig())) == 3  # 2.56 -> 3 crops of 512 x 600
    assert pan_and_scan_crops(synthetic(542, 130), ImageConfig()) == []  # crops of 130 pixels are too small
    # 640 x 427 (ratio 1.499): transformers' 1.2 gives 2 crops; gemma_pytorch's hard-coded 1.5 would give none
    assert [c.size for c in pan_and_scan_crops(synthetic(640, 427), ImageConfig())] == [(320, 427)] * 2
    assert pan_and_scan_crops(synthetic(640, 427), ImageConfig(pan_and_scan_min_ratio_to_activate=1.5)) == []


def test_preprocess_takes_any_pil_mode_as_transformers_does():
    """preprocess makes its inputs RGB itself (transparency on white), not only load_image."""
    images = [synthetic(300, 200, "RGBA", seed=4), synthetic(200, 500, "L", seed=5), synthetic(90, 60, seed=6)]
    ref = hf_image_processor()(images=images, return_tensors="pt", do_pan_and_scan=True)
    ours, crops = preprocess(images, ImageConfig(pan_and_scan=True))
    assert crops == ref["num_crops"].tolist() and torch.equal(ours, ref["pixel_values"])


def test_exif_orientation_is_applied_like_datasets_and_transformers(tmp_path):
    datasets = pytest.importorskip("datasets")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    path = tmp_path / "phone.jpg"
    synthetic(80, 40).save(path, exif=exif.tobytes())
    refs = [datasets.Image().decode_example({"path": str(path), "bytes": None}),
            transformers.image_utils.load_image(str(path))]
    for source in (str(path), path.read_bytes(), {"bytes": None, "path": str(path)}):
        ours = load_image(source, "row 1")
        for ref in refs:
            assert ours.size == ref.size == (40, 80)
            assert np.array_equal(np.asarray(ours), np.asarray(ref.convert("RGB")))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gemma3-270m")


@pytest.fixture(scope="module")
def processor(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    extra = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    hf_tok = transformers.AutoTokenizer.from_pretrained(d, extra_special_tokens=extra)
    assert hf_tok.image_token_id == IMAGE_TOKEN_ID  # the first id past the 262,144 pieces
    return transformers.Gemma3Processor(image_processor=hf_image_processor(), tokenizer=hf_tok,
                                        chat_template=hf_tok.chat_template, image_seq_length=256)


IMG, TXT = {"type": "image"}, lambda t: {"type": "text", "text": t}
CHATS = {
    "one_image": ([{"role": "user", "content": [IMG, TXT("What is this?")]},
                   {"role": "assistant", "content": [TXT("A woman in uniform.")]}], ["grace_hopper"]),
    "two_images_one_turn": ([{"role": "user", "content": [TXT("Compare"), IMG, TXT("and"), IMG]}],
                            ["small", "grey_tall"]),
    "text_first_then_image_later_turn": ([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."}, {"role": "user", "content": [IMG, TXT(" Describe it. ")]}],
        ["rgba_wide"]),
    "an_image_per_user_turn": ([{"role": "user", "content": [IMG, TXT("a?")]}, {"role": "assistant", "content": "x"},
                                {"role": "user", "content": [TXT("and"), IMG]}], ["grey_tall", "small"]),
}


@pytest.mark.parametrize("pan_and_scan", [False, True])
@pytest.mark.parametrize("chat", sorted(CHATS))
def test_prompt_ids_equal_gemma3_processor(tok, processor, chat, pan_and_scan):
    messages, names = CHATS[chat]
    images = [IMAGES[n]() for n in names]
    gen = messages[-1]["role"] == "user"
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    # the rendered text already starts with <bos>: transformers must not add a second one
    ref = processor(text=text, images=images, return_tensors="pt", do_pan_and_scan=pan_and_scan,
                    add_special_tokens=False)
    ours = encode_chat(tok, messages, [load_image(i, chat) for i in images], ImageConfig(pan_and_scan=pan_and_scan),
                       add_generation_prompt=gen)
    assert ours.ids == ref["input_ids"][0].tolist()
    assert ours.token_type_ids == ref["token_type_ids"][0].tolist()
    assert torch.equal(ours.pixel_values, ref["pixel_values"])
    assert sum(ours.token_type_ids) == 256 * len(ours.pixel_values)
    if pan_and_scan and chat == "text_first_then_image_later_turn":
        assert ours.num_crops == [3]


def test_loss_mask_is_false_on_image_tokens(tok):
    messages = [{"role": "user", "content": [IMG, TXT("Colour?")]},
                {"role": "assistant", "content": "Red <end_of_image>"}]  # a literal image token in a reply
    enc = encode_chat(tok, messages, [synthetic(40, 40)], ImageConfig())
    assert any(enc.loss_mask)  # the reply is trained
    assert EOI_TOKEN_ID in enc.ids[enc.ids.index(IMAGE_TOKEN_ID) + 257:]  # the reply's literal one is there
    for t, m in zip(enc.ids, enc.loss_mask):
        if t in (IMAGE_TOKEN_ID, BOI_TOKEN_ID, EOI_TOKEN_ID):
            assert not m


def test_a_literal_soft_token_in_text_stays_text(tok):
    """Only image blocks produce id 262,144: typed in a text-only chat the string is text (the id is past a
    text model's vocabulary), and in a chat with images it is an error rather than a phantom image token."""
    chat = [{"role": "user", "content": "what is <image_soft_token>?"},
            {"role": "assistant", "content": "<image_soft_token>"}]
    enc = tok.apply_chat_template(chat)
    assert max(enc.ids) < tok.vocab_size and tok.decode(enc.ids).count("<image_soft_token>") == 2
    with pytest.raises(UserError, match="literal text <image_soft_token>"):
        encode_chat(tok, [{"role": "user", "content": [IMG, TXT("<image_soft_token>")]}], [synthetic(8, 8)],
                    ImageConfig())


def test_row_images_accept_every_form_and_name_bad_ones(tmp_path):
    path = tmp_path / "a.png"
    synthetic(30, 20).save(path)
    buf = io.BytesIO()
    synthetic(30, 20, "RGBA").save(buf, format="PNG")
    row = {"messages": [{"role": "user", "content": [IMG, IMG, IMG, IMG, TXT("?")]},
                        {"role": "assistant", "content": "x"}],
           "images": [str(path), buf.getvalue(), synthetic(5, 5), {"bytes": None, "path": str(path)}]}
    assert [im.mode for im in row_images(row, "data.jsonl row 3")] == ["RGB"] * 4

    def error(**change):
        with pytest.raises(UserError) as e:
            row_images({**row, **change}, "data.jsonl row 3")
        assert "data.jsonl row 3" in str(e.value) and "fix:" in str(e.value)
        return str(e.value)

    assert str(tmp_path / "missing.png") in error(images=[str(tmp_path / "missing.png")] * 4)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert "bad.png" in error(images=[str(tmp_path / "bad.png")] * 4) and "not a readable image" in error(
        images=[str(tmp_path / "bad.png")] * 4)
    assert "more image parts than images" in error(images=[str(path)])
    assert "more images than image parts" in error(images=[str(path)] * 5)
    model_turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [IMG]}]
    assert "assistant turn" in error(messages=model_turn, images=[str(path)])
    system = [{"role": "system", "content": [IMG]}, {"role": "user", "content": "hi"}]
    assert "system message with an image part" in error(messages=system, images=[str(path)])
