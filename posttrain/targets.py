"""Teacher targets computed once and kept on disk, so the student streams them without the teacher in memory.

    cache = TargetCache.build(stage_dir / "targets", teacher, teacher_examples, cfg, pad_id)
    ids, values = cache.batch(student_batch)     # (n, k) int32 ids, (n, k) float32 values, in loss order

Layout of the directory: `shard_<rank>_<j>.ids.npy` (tokens, k) int32 and `.probs.npy` (tokens, k)
float16, `index_<rank>.json` (example -> shard, first row, rows) and `manifest.json` (what the targets
were made from: method, k, temperature, seed, example count; a cache made from something else is
rebuilt, never silently reused). Each rank computes the examples i with i % world == rank; every rank
reads them all. Per example, the draw uses a generator seeded by derive_seed(seed, what, i): the same targets whatever
the number of ranks or the batch an example lands in. For method=topk the file holds the teacher's
probabilities of its top ids; `batch` returns their logs (chunked_topk_kl renormalises them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write
from .engine import barrier, rank, world_size
from .loader import Batch, collate
from .losses import teacher_targets
from .seeds import derive_seed
from .tracking import progress

EXAMPLES_PER_SHARD = 256


class TargetCache:
    def __init__(self, root: Path, topk: bool):
        self.root, self.topk = Path(root), topk
        self.index: dict[int, tuple[str, int, int]] = {}
        for path in sorted(self.root.glob("index_*.json")):
            for i, (shard, first, rows) in json.loads(path.read_text()).items():
                self.index[int(i)] = (shard, first, rows)
        self._open: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @staticmethod
    def manifest(cfg, n_examples: int) -> dict:
        d = cfg.distill
        return {"method": d.method, "k": d.top_k if d.method == "topk" else d.num_samples,
                "temperature": d.temperature, "seed": cfg.seed, "examples": n_examples,
                "teacher": cfg.model.teacher.model_dump() if cfg.model.teacher else None,
                "context": d.teacher_context, "max_seq_len": cfg.data.max_seq_len,
                "draws": "seeds.derive_seed"}  # how the per-example seeds are made

    @classmethod
    @torch.no_grad()
    def build(cls, root: Path, teacher, examples, cfg, pad_id: int) -> "TargetCache":
        """Compute this rank's share of the targets (unless a matching cache is complete), then load all."""
        root = Path(root)
        want = cls.manifest(cfg, len(examples))
        manifest = root / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text()) == want:
            return cls(root, cfg.distill.method == "topk")
        barrier()
        if rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            for old in root.iterdir():
                old.unlink()
        barrier()
        d = cfg.distill
        topk = d.method == "topk"
        k = d.top_k if topk else d.num_samples
        mine = list(range(rank(), len(examples), world_size()))
        B = cfg.data.micro_batch_size
        index: dict[int, tuple[str, int, int]] = {}
        ids_buf: list[torch.Tensor] = []
        probs_buf: list[torch.Tensor] = []
        shard, rows_in_shard, count = 0, 0, 0

        def flush():
            nonlocal shard, rows_in_shard, ids_buf, probs_buf
            if not ids_buf:
                return
            name = f"shard_{rank()}_{shard}"
            _save_npy(root / f"{name}.ids.npy", torch.cat(ids_buf).numpy().astype(np.int32))
            _save_npy(root / f"{name}.probs.npy", torch.cat(probs_buf).numpy().astype(np.float16))
            shard, rows_in_shard, ids_buf, probs_buf = shard + 1, 0, [], []

        bar = progress(total=len(mine), desc="teacher targets")
        for s in range(0, len(mine), B):
            group = mine[s:s + B]
            rows = [[i] for i in group]
            batch = collate(examples, rows, max(len(examples[i][0]) for i in group), pad_id).to(teacher.device)
            # Per example: its own generator, so targets do not depend on batching or the number of ranks.
            def head(h, w):
                out = []
                for r, i in enumerate(group):
                    g = torch.Generator(device=teacher.device)
                    g.manual_seed(derive_seed(cfg.seed, "distill/cached_targets", i))
                    kw = {} if topk else {"temperature": d.temperature, "generator": g}
                    out.append(teacher_targets(h[r][batch.loss_mask[r]], w, k=min(k, w.shape[0]),
                                               method="topk" if topk else "sample",
                                               chunk_tokens=cfg.data.loss_chunk_tokens, **kw))
                return out

            for i, (tid, tval) in zip(group, teacher(head, batch.ids, batch.positions, batch.segments, **batch.images)):
                probs = tval.float().exp() if topk else tval.float()
                index[i] = (f"shard_{rank()}_{shard}", rows_in_shard, tid.shape[0])
                ids_buf.append(tid.int().cpu())
                probs_buf.append(probs.half().cpu())
                rows_in_shard += tid.shape[0]
                count += 1
                if count % EXAMPLES_PER_SHARD == 0:
                    flush()
            bar.update(len(group))
        flush()
        bar.close()
        atomic_write(root / f"index_{rank()}.json", lambda tmp: tmp.write_text(json.dumps({str(i): v for i, v in index.items()})))
        barrier()
        if rank() == 0:
            manifest.write_text(json.dumps(want))  # last: its presence means the cache is complete
        barrier()
        return cls(root, topk)

    def _shard(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._open:
            self._open[name] = (np.load(self.root / f"{name}.ids.npy", mmap_mode="r"),
                                np.load(self.root / f"{name}.probs.npy", mmap_mode="r"))
        return self._open[name]

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard, first, rows = self.index[i]
        ids, probs = self._shard(shard)
        return torch.from_numpy(np.array(ids[first:first + rows])), torch.from_numpy(np.array(probs[first:first + rows]))

    def batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets for a student batch's loss positions, row-major, segments in order."""
        parts = [self.example(i) for row in batch.index for i in row]
        ids = torch.cat([a for a, _ in parts])
        values = torch.cat([b for _, b in parts]).float()
        assert ids.shape[0] == int(batch.loss_mask.sum()), "cached targets do not match the batch's loss positions"
        return ids, (values.log() if self.topk else values)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a path
            np.save(f, array)

    atomic_write(path, write)


__all__ = ["TargetCache"]
