"""Data tests: loading and validation errors, tokenization, packing without cross-document leaks,
shuffling, rank shards and exact resume (posttrain/data.py, posttrain/loader.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

import posttrain
from posttrain import data
from posttrain.data import (IGNORE, DataLoader, Example, collate, epoch_order, load_rows, pack, tokenize_rows,
                            validate_rows)
from posttrain.errors import UserError
from posttrain.model import init_weights


@pytest.fixture(scope="module")
def tok():
    return posttrain.load_tokenizer("gemma3-270m")


def chat(*turns: str, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return {"messages": msgs}


def rows_for_training(n: int = 24, seed: int = 0) -> list[dict]:
    """Chats and prompt/response rows of varied lengths."""
    r = random.Random(seed)
    words = "the cat sat on a mat while seven dogs ran past quickly and barked at birds".split()
    say = lambda k: " ".join(r.choice(words) for _ in range(k))  # noqa: E731
    rows = []
    for i in range(n):
        if i % 3 == 0:
            rows.append({"prompt": say(r.randint(1, 6)), "response": say(r.randint(1, 8)), "system": "Be kind."})
        elif i % 3 == 1:
            rows.append(chat(say(r.randint(1, 5)), say(r.randint(1, 9))))
        else:
            rows.append(chat(say(2), say(3), say(r.randint(1, 4)), say(r.randint(1, 6)), system="Short."))
    return rows


# ----------------------------------------------------------------------------- bad data

OK = '{"prompt": "What is 2+2?", "response": "4"}'
BAD_CASES = {
    # id: (file name, content, substrings the error must contain: file, row, field, rule)
    "missing_field": ("a.jsonl", f'{OK}\n\n{{"prompt": "hi"}}\n', ["a.jsonl:3:", "response: missing"]),
    "missing_content": ("a.jsonl", '{"messages": [{"role": "user"}]}\n',
                        ["a.jsonl:1:", "messages[0].content: missing"]),
    "content_number": ("a.jsonl", f'{OK}\n{{"messages": [{{"role": "user", "content": "hi"}}, '
                       '{"role": "assistant", "content": 42}]}\n',
                       ["a.jsonl:2:", "messages[1].content: must be a string, got int"]),
    "prompt_number": ("a.jsonl", '{"prompt": 7, "response": "x"}\n', ["a.jsonl:1:", "prompt: must be a string"]),
    "empty_file": ("a.jsonl", "", ["a.jsonl is empty"]),
    "blank_file": ("a.jsonl", "\n  \n", ["a.jsonl is empty"]),
    "empty_json_array": ("a.json", "[]", ["a.json is empty"]),
    "not_alternating": ("a.jsonl", f'{OK}\n{OK}\n' + json.dumps(chat("hi", "hello")) + "\n"
                        + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                                   {"role": "assistant", "content": "c"}]}) + "\n",
                        ["a.jsonl:4:", "messages[1]", "alternate"]),
    "malformed_json_line": ("a.jsonl", f'{OK}\n{OK}\n{{"prompt": "x", "response": \n{OK}\n',
                            ["a.jsonl:3:", "not valid JSON"]),
    "empty_conversation": ("a.jsonl", '{"messages": []}\n', ["a.jsonl:1:", "messages: empty conversation"]),
    "last_turn_user": ("a.jsonl", json.dumps(chat("hi", "hello", "bye")) + "\n",
                       ["a.jsonl:1:", "messages[2].role", "last turn is 'user'"]),
    "system_not_first": ("a.jsonl", json.dumps({"messages": [{"role": "user", "content": "a"},
                                                             {"role": "system", "content": "b"}]}) + "\n",
                         ["a.jsonl:1:", "messages[1]", "system message is only allowed as the first"]),
    "unknown_role": ("a.jsonl", json.dumps({"messages": [{"role": "human", "content": "a"}]}) + "\n",
                     ["a.jsonl:1:", "messages[0]", "unknown role 'human'"]),
    "no_format": ("a.jsonl", '{"question": "a", "answer": "b"}\n', ["a.jsonl:1:", "neither 'messages'"]),
    "json_array_wrong_type": ("a.json", f'[{OK}, {{"prompt": "a", "response": ["b"]}}]',
                              ["a.json:row 2:", "response: must be a string, got list"]),
    "json_object_not_rows": ("a.json", '{"data": [\n  {"prompt": "a", "response": "b"}\n]}',
                             ["a.json holds one JSON object"]),
    "json_array_malformed": ("a.json", '[{"prompt": "a",\n "response": }]', ["a.json:2:", "not valid JSON"]),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_names_file_row_and_field(tmp_path, case):
    name, content, expected = BAD_CASES[case]
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError) as err:
        validate_rows(load_rows(path))
    for s in expected:
        assert s in str(err.value), f"{s!r} not in:\n{err.value}"


def test_bad_parquet_row_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": ["x", None]}), path)
    with pytest.raises(UserError, match=r"p\.parquet:row 2: response: missing"):
        validate_rows(load_rows(path))


def test_many_problems_are_listed_up_to_a_limit(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join([OK] + ['{"prompt": 1, "response": "x"}'] * 15) + "\n")
    with pytest.raises(UserError) as err:
        validate_rows(load_rows(path))
    msg = str(err.value)
    assert msg.startswith("15 of 16 data rows are unusable")
    assert "many.jsonl:2: prompt" in msg and "many.jsonl:11: prompt" in msg and "many.jsonl:12:" not in msg
    assert "... and 5 more" in msg


def test_tokenize_validates_first(tok):
    with pytest.raises(UserError, match=r"row 2: messages\[0\]\.content: missing"):
        tokenize_rows([{"prompt": "a", "response": "b"}, {"messages": [{"role": "user"}]}], tok, 64)


# ----------------------------------------------------------------------------- sources


def test_local_formats_and_directory_split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = rows_for_training(6)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))  # JSON Lines named .json
    pr = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(pr), tmp_path / "c.parquet")
    assert load_rows(tmp_path / "a.jsonl") == rows
    assert load_rows(tmp_path / "b.json") == rows
    assert load_rows(tmp_path / "lines.json") == rows
    assert load_rows(str(tmp_path / "c.parquet")) == pr
    assert load_rows(tmp_path / "a.jsonl").where[2] == f"{tmp_path / 'a.jsonl'}:3"

    d = tmp_path / "ds"
    (d / "data").mkdir(parents=True)
    (d / "data" / "train-0.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (d / "data" / "train-1.jsonl").write_text(json.dumps(rows[1]) + "\n")
    (d / "data" / "test-0.jsonl").write_text(json.dumps(rows[2]) + "\n")
    (d / "README.md").write_text("not data")
    assert load_rows(d) == rows[:2]
    assert load_rows(d, split="test") == rows[2:3]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"directory .*empty has no \.jsonl"):
        load_rows(tmp_path / "empty")


def test_registry_and_missing_and_offline_sources(tmp_path, monkeypatch):
    made = [{"prompt": "1+1", "response": "2"}]
    rows = load_rows("arith", registry={"arith": lambda: made})
    assert rows == made and rows.where == ["<arith>:1"]
    with pytest.raises(UserError, match=r"'nope\.jsonl' does not exist.*local \.jsonl.*built-in names: arith"):
        load_rows("nope.jsonl", registry={"arith": lambda: made})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(UserError, match=r"'someone/chats'.*hub is not reachable.*local \.jsonl"):
        load_rows("someone/chats")


# ----------------------------------------------------------------------------- tokenization


def test_loss_mask_covers_exactly_the_model_replies(tok):
    row = chat("Hi there", "Hello! How can I help?", "What is 2+2?", "It is 4.", system="Be brief.")
    (ex,) = tokenize_rows([row], tok, 256)
    assert (ex.ids, ex.loss_mask) == tuple(tok.apply_chat_template(row["messages"]))
    trained = [i for i, m in zip(ex.ids, ex.loss_mask) if m]
    assert tok.decode(trained) == "Hello! How can I help?<end_of_turn>It is 4.<end_of_turn>"
    # In a batch the same tokens are the targets, one position earlier.
    b = collate([ex], [[0]], len(ex.ids), tok.pad_id)
    assert tok.decode(b.targets[b.loss_mask].tolist()) == "Hello! How can I help?<end_of_turn>It is 4.<end_of_turn>"
    # prompt/response rows are the same conversation.
    (pr,) = tokenize_rows([{"prompt": "Hi", "response": "Hello", "system": "S"}], tok, 256)
    assert pr[:2] == tuple(tok.apply_chat_template(chat("Hi", "Hello", system="S")["messages"]))
    # Prompt sets end with the generation prompt and train nothing.
    p, q = tokenize_rows([{"prompt": "Hi"}, {"prompt": "Hi", "response": "a reference"}], tok, 256,
                         require_reply=False)
    assert tok.decode(p.ids) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert p == q and not any(p.loss_mask)


def test_truncation_and_drop_are_counted(tok, caplog):
    long = {"prompt": "hi", "response": "word " * 100}
    late = {"prompt": "word " * 100, "response": "late reply"}  # the reply starts after the cut
    short = {"prompt": "hi", "response": "ok"}
    with caplog.at_level("INFO", logger="posttrain.data"):
        dropped = tokenize_rows([short, long, late, short], tok, 48)
    assert (dropped.rows, dropped.dropped, dropped.truncated, len(dropped)) == (4, 2, 0, 2)
    assert "2 dropped" in caplog.text
    cut = tokenize_rows([short, long, late, short], tok, 48, truncation="truncate")
    assert (cut.dropped, cut.truncated, len(cut)) == (1, 1, 3)
    assert len(cut[1].ids) == 48 and all(cut[1].loss_mask[-20:])
    with pytest.raises(UserError, match=r"all 2 rows are longer than max_seq_len=48"):
        tokenize_rows([long, late], tok, 48)


# ----------------------------------------------------------------------------- packing


def first_fit_naive(lengths, capacity):
    rows, room = [], []
    for i, n in enumerate(lengths):
        k = next((k for k, r in enumerate(room) if r >= n), len(rows))
        if k == len(rows):
            rows.append([])
            room.append(capacity)
        rows[k].append(i)
        room[k] -= n
    return rows


def test_pack_is_greedy_first_fit():
    assert pack([5, 3, 4, 2, 6], 8) == [[0, 1], [2, 3], [4]]
    assert pack([6, 5, 2, 3], 8) == [[0, 2], [1, 3]]  # the 2 goes back to the first row
    r = random.Random(0)
    lengths = [r.randint(1, 64) for _ in range(500)]
    assert pack(lengths, 64) == first_fit_naive(lengths, 64)


def test_packed_layout(tok):
    examples = tokenize_rows(rows_for_training(12), tok, 96)
    loader = DataLoader(examples, batch_size=2, max_seq_len=96, pad_id=tok.pad_id, seed=3, epochs=1)
    for b in loader:
        assert b.ids.shape == (2, 96)
        assert torch.equal(b.loss_mask, b.targets != IGNORE)
        for r, row in enumerate(b.index):
            start = 0
            for s, i in enumerate(row, 1):
                n = len(examples[i].ids)
                assert b.ids[r, start:start + n].tolist() == examples[i].ids
                assert b.positions[r, start:start + n].tolist() == list(range(n))
                assert (b.segments[r, start:start + n] == s).all()
                assert b.targets[r, start + n - 1] == IGNORE  # never predicts the next document
                start += n
            assert (b.segments[r, start:] == 0).all() and (b.targets[r, start:] == IGNORE).all()
            assert (b.ids[r, start:] == tok.pad_id).all()


@pytest.fixture(scope="module")
def tiny_model():
    cfg = posttrain.GemmaConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                                head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                layer_types=("sliding_attention", "full_attention"))
    model = posttrain.build_model(cfg).eval()
    # A larger init than 0.02 so that attending across documents visibly changes the losses.
    init_weights(model, std=0.5, generator=torch.Generator().manual_seed(0))
    # Matrices this small gain nothing from threads, and on a busy machine OpenMP waits dominate.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model
    torch.set_num_threads(threads)


def token_losses(model, ids, targets, positions=None, segments=None):
    """Cross-entropy (B, T) at the trained positions, 0 elsewhere; logits only where trained."""
    keep = targets != IGNORE
    with torch.no_grad():
        logits = model.logits(model.hidden_states(ids, positions, segments)[keep])
    out = torch.zeros(targets.shape)
    out[keep] = F.cross_entropy(logits, targets[keep], reduction="none")
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_batch_losses_equal_each_document_alone(tok, tiny_model, packing):
    examples = tokenize_rows(rows_for_training(10), tok, 64)
    loader = DataLoader(examples, batch_size=2, max_seq_len=64, pad_id=tok.pad_id, packing=packing, epochs=1,
                        drop_last=False)
    compared, shared_rows = 0, 0
    for b in loader:
        got = token_losses(tiny_model, b.ids, b.targets, b.positions, b.segments)
        if packing:
            leaky = token_losses(tiny_model, b.ids, b.targets)  # no positions/segments: documents see each other
        for r, row in enumerate(b.index):
            shared_rows += len(row) > 1
            start = 0
            for i in row:
                ids = torch.tensor([examples[i].ids])
                alone = collate(examples, [[i]], ids.shape[1], tok.pad_id)
                want = token_losses(tiny_model, ids, alone.targets)[0]
                end = start + ids.shape[1]
                assert torch.equal(b.targets[r, start:end], alone.targets[0])
                m = alone.loss_mask[0]
                torch.testing.assert_close(got[r, start:end][m], want[m], rtol=0, atol=1e-4)
                if packing and start > 0:
                    assert (leaky[r, start:end][m] - want[m]).abs().max() > 1e-2, "test cannot see leaks"
                compared += int(m.sum())
                start = end
    assert compared == sum(sum(e.loss_mask[1:]) for e in examples)  # every trained token was checked
    assert shared_rows > 0 or not packing


# ----------------------------------------------------------------------------- order, shards, resume


def synthetic(n: int, seed: int = 0) -> list[Example]:
    r = random.Random(seed)
    out = []
    for i in range(n):
        k = r.randint(3, 20)
        out.append(Example([1000 + i] * k, [False] + [True] * (k - 1)))
    return out


def test_shuffle_is_deterministic_by_seed_and_epoch():
    a = epoch_order(200, seed=1, epoch=0)
    assert a == epoch_order(200, seed=1, epoch=0) and sorted(a) == list(range(200))
    assert a != epoch_order(200, seed=2, epoch=0) and a != epoch_order(200, seed=1, epoch=1)
    ex = synthetic(50)
    stream = lambda seed: [b.index for b in DataLoader(ex, batch_size=2, max_seq_len=32, pad_id=0,  # noqa: E731
                                                        seed=seed, epochs=2)]
    assert stream(5) == stream(5) and stream(5) != stream(6)


@pytest.mark.parametrize("packing", [True, False])
def test_rank_shards_are_disjoint_covering_and_equal(packing):
    ex, W, B = synthetic(61), 3, 2
    kw = dict(batch_size=B, max_seq_len=32, pad_id=0, seed=7, packing=packing, epochs=1)
    # drop_last=False: every example exactly once over the ranks, same number of batches on each.
    shards = [[b for b in DataLoader(ex, rank=r, world_size=W, drop_last=False, **kw)] for r in range(W)]
    assert len({len(s) for s in shards}) == 1
    seen = [i for s in shards for b in s for row in b.index for i in row]
    assert sorted(seen) == list(range(len(ex)))
    # drop_last=True: rank r takes global batches r, r+W, ...: the same micro-batches as one rank.
    one = [b.index for b in DataLoader(ex, **kw)]
    shards = [[b.index for b in DataLoader(ex, rank=r, world_size=W, **kw)] for r in range(W)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(one) // W
    assert [shards[r][k] for k in range(len(shards[0])) for r in range(W)] == one[:len(shards[0]) * W]
    # Too little data for one batch per rank is a clear error.
    with pytest.raises(UserError, match="needed for one full batch per rank"):
        DataLoader(ex[:3], batch_size=2, max_seq_len=20, pad_id=0, world_size=4, packing=False)


def test_resume_yields_the_same_remaining_batches():
    ex = synthetic(30)
    make = lambda **kw: DataLoader(ex, batch_size=2, max_seq_len=40, pad_id=0, seed=11, **kw)  # noqa: E731
    straight = make()
    per_epoch = len(straight.plan(0))
    for _ in range(3):
        next(straight)
    saved = json.loads(json.dumps(straight.state_dict()))  # survives a checkpoint file
    expected = [next(straight) for _ in range(2 * per_epoch + 2)]  # crosses two epoch boundaries
    resumed = make()
    resumed.load_state_dict(saved)
    for want, got in zip(expected, (next(resumed) for _ in expected)):
        assert want.index == got.index
        for k in ("ids", "targets", "loss_mask", "positions", "segments"):
            assert torch.equal(getattr(want, k), getattr(got, k)), k
    assert resumed.state == straight.state and resumed.state.epoch == 2
    with pytest.raises(UserError, match=r"world_size 1 -> 2"):
        make(world_size=2).load_state_dict(saved)
    # A bounded loader stops after its epochs.
    assert sum(1 for _ in make(epochs=2)) == len(make().plan(0)) + len(make().plan(1))
