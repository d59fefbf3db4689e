"""Context parallelism's cut (models/context_parallel.py): for CP = 2 and 4 every rank's tokens, labels, loss mask,
M-RoPE ids and embeddings (images inserted before the cut) put back in sequence order are the whole sequence's, and
each rank holds what Megatron's get_batch_on_this_cp_rank gives it. (The 2-process training run against one
process is tests/test_parallel.py's cp2 layout.)"""

from dataclasses import dataclass

import pytest
import torch

from nemo_pixellm.data.dataset import TrainingSequences
from nemo_pixellm.data.samples import ShardSamples
from nemo_pixellm.data.shards import write_shards
from nemo_pixellm.data.sources import ensure_tokenizer
from nemo_pixellm.data.synthetic import scene_record
from nemo_pixellm.models.context_parallel import cut, rank_positions

from conftest import TINY_LM, TINY_VISION_56, build_pixellm


@dataclass
class Rank:
    """A CP group as ``cut`` sees one rank of it."""
    cp: int
    index: int

    def size(self) -> int:
        return self.cp

    def rank(self) -> int:
        return self.index


@pytest.fixture(scope="module")
def batch_and_model(megatron_single_process, cache_dir, tmp_path_factory):
    tokenizer = ensure_tokenizer(cache_dir, 512, 1234)
    root = tmp_path_factory.mktemp("cp")
    write_shards((scene_record(7, i, 56) for i in range(8)), root / "vl", shard_size=8)
    data = TrainingSequences([ShardSamples(root / "vl", tokenizer, "vqa", max_tiles=1)], [1.0], tokenizer, 96, 4, 56)
    batch = TrainingSequences.collate_fn([data[i] for i in range(4)])
    model = build_pixellm(megatron_single_process, **TINY_LM, **TINY_VISION_56, vocab_size=512, seq_length=96,
                          image_token_id=tokenizer.image_id)
    return batch, model, tokenizer.image_id


@pytest.mark.parametrize("cp", [2, 4])
def test_ranks_put_back_in_order_are_the_whole_sequence(cp, batch_and_model, monkeypatch):
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch, model, image_id = batch_and_model
    seq = batch["tokens"].shape[1]
    assert ((batch["tokens"] == image_id).sum(1) > 0).all()  # every row holds an image
    with torch.no_grad():
        whole = model.embed(batch["tokens"], batch["images"], batch["image_grids"])  # [s, b, h]
    parts = {key: [] for key in ("tokens", "labels", "loss_mask", "position_ids", "embeddings")}
    order = []
    for r in range(cp):
        group = Rank(cp, r)
        for key in ("tokens", "labels", "loss_mask"):
            parts[key].append(cut(batch[key], 1, group))
        parts["position_ids"].append(cut(batch["position_ids"], 2, group))
        model.cp_group = group
        with torch.no_grad():
            parts["embeddings"].append(model.embed(batch["tokens"], batch["images"], batch["image_grids"]))
        order.append(rank_positions(seq, cp, r))
        # Megatron's own load-balanced split of the [b, s] tensors gives this rank the same tokens.
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: cp)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: r)
        theirs = get_batch_on_this_cp_rank({k: batch[k] for k in ("tokens", "labels", "loss_mask")}, False, object())
        monkeypatch.undo()
        for key in ("tokens", "labels", "loss_mask"):
            assert torch.equal(theirs[key], parts[key][-1]), key
    model.cp_group = None
    inverse = torch.cat(order).argsort()
    assert torch.equal(torch.cat(parts["tokens"], 1)[:, inverse], batch["tokens"])
    assert torch.equal(torch.cat(parts["labels"], 1)[:, inverse], batch["labels"])
    assert torch.equal(torch.cat(parts["loss_mask"], 1)[:, inverse], batch["loss_mask"])
    assert torch.equal(torch.cat(parts["position_ids"], 2)[:, :, inverse], batch["position_ids"])
    assert torch.equal(torch.cat(parts["embeddings"], 0)[inverse], whole)
    assert all(p.shape[1] == seq // cp for p in parts["tokens"])


def test_a_sequence_that_does_not_cut_evenly_is_refused():
    with pytest.raises(ValueError, match="make seq_length a multiple of 2 x model.context_parallel_size"):
        rank_positions(100, 4, 0)
