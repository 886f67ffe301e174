"""Long-context planning: the KV-cache savings of the 5:1 layout and sequence parallelism's split."""

from __future__ import annotations

import pytest

from posttrain.model import PRESETS
from posttrain.plan import GiB, plan
from posttrain.plan_long import activations_gib, kv_cache_gib, table
from posttrain.recipe import load_config


@pytest.fixture(autouse=True)
def _no_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.mark.parametrize("size, local_global, all_global", [("4b", 2.61, 17.0), ("12b", 8.31, 48.0),
                                                            ("27b", 10.41, 62.0)])
def test_kv_cache_at_128k_matches_the_report_layout(size, local_global, all_global):
    # one 131,072-token sequence in bf16: 5 global layers in 34 (4B), 8 in 48 (12B), 10 in 62 (27B)
    kv = kv_cache_gib(PRESETS[size], 131_072)
    assert kv["5:1 + window"] == pytest.approx(local_global, abs=0.005)
    assert kv["all global"] == pytest.approx(all_global, abs=0.005)


def test_activations_split_over_sequence_parallel_ranks():
    arch = PRESETS["4b"]
    one = activations_gib(arch, 131_072, 1)
    assert [activations_gib(arch, 131_072, n) for n in (2, 4, 8)] == pytest.approx([one / 2, one / 4, one / 8])
    assert "4b" in table() and "act. SP=8" in table()


def test_it_4b_128k_plan_shards_the_sequence():
    cfg = load_config(["recipe=it_4b_128k"])
    assert cfg.data.max_seq_len == 131_072 and cfg.distributed.sequence_parallel == 8
    assert PRESETS["4b"].rope_global_scaling == 8 and PRESETS["4b"].sliding_window == 1024
    sharded = plan(cfg)
    whole = plan(load_config(["recipe=it_4b_128k", "distributed.sequence_parallel=1"]))
    acts = sharded.stages["distill"].train["activations"], whole.stages["distill"].train["activations"]
    assert acts[1] == 8 * acts[0]
    assert whole.peak_bytes - sharded.peak_bytes == acts[1] - acts[0] > 30 * GiB
    text = sharded.format()
    assert "sequence parallel 8" in text and "x 1 replica(s) = 8 sequences" in text
    assert "2.61 GiB with the 5:1 local/global layers (17.00 GiB" in text
