"""From shards to model inputs: packing isolates samples exactly, mixing hits its token share, the chat
template puts loss on assistant tokens only."""

import pytest
import torch

from nemo_pixellm.data.dataset import PACK_LOOKAHEAD, MixtureStream, TrainingSequences, build_sequence
from nemo_pixellm.data.sources import ensure_tokenizer, text_record
from nemo_pixellm.data.samples import ImageSegment, ShardSamples, TextSegment, chat_segments
from nemo_pixellm.data.shards import write_shards
from nemo_pixellm.data.synthetic import scene_record
from nemo_pixellm.training.step import packed_seq_params

from conftest import TINY_LM, TINY_VISION_56, build_pixellm


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return ensure_tokenizer(cache_dir, 512, 1234)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_shards((scene_record(7, i, 56) for i in range(24)), root / "vl", shard_size=10)
    write_shards((text_record(8, i) for i in range(24)), root / "text", shard_size=10)
    return root


def sources(shards, tokenizer, task="caption"):
    return [ShardSamples(shards / "vl", tokenizer, task, max_tiles=1), ShardSamples(shards / "text", tokenizer, "text")]


@pytest.fixture(scope="module")
def model(megatron_single_process, tokenizer):
    return build_pixellm(megatron_single_process, **TINY_LM, **TINY_VISION_56, vocab_size=512, seq_length=160,
                         image_token_id=tokenizer.image_id)


def plan(data: TrainingSequences, count: int | None = None) -> list[list[tuple[int, int]]]:
    """The (source, index) members of the first ``count`` sequences (all by default)."""
    return [data.members(i) for i in range(len(data) if count is None else count)]


def per_sample_losses(model, batch, attention_mask=None) -> list[float]:
    """Summed next-token loss of every sample in the batch, in order."""
    with torch.no_grad():
        loss = model(batch["tokens"], batch["position_ids"], attention_mask=attention_mask,
                     packed_seq_params=None if attention_mask is not None else packed_seq_params(batch),
                     labels=batch["labels"], images=batch["images"], image_grids=batch["image_grids"])
    out = []
    for row, sequence in enumerate(batch["samples"]):
        start = 0
        for member in sequence:
            span = slice(start, start + member.tokens)
            out.append(float((loss[row, span] * batch["loss_mask"][row, span]).sum()))
            start += member.tokens
    return out


def test_packed_equals_unpacked(shards, tokenizer, model):
    """Packing isolation: the same samples give the same per-sample losses packed (THD: the rows as one sequence
    cut at every sample, Megatron's PackedSeqParams) or one per sequence, and as a block-diagonal attention mask
    over the padded rows gives them."""
    packed = TrainingSequences(sources(shards, tokenizer), [0.5, 0.5], tokenizer, 160, 6, 56, pack=True, seed=3)
    assert max(len(members) for members in plan(packed)) >= 3  # images, captions and text share sequences
    items = [packed[i] for i in range(len(packed))]
    batch = TrainingSequences.collate_fn(items)
    # THD boundaries: every sample's first token, every row's padding, the end of the b * s tokens
    starts = []
    for row, item in enumerate(items):
        offsets = torch.tensor([0] + [m.tokens for m in item["samples"]]).cumsum(0).tolist()
        starts += [row * 160 + o for o in offsets if o < 160]
    assert batch["cu_seqlens_q"].tolist() == starts + [len(items) * 160]
    assert batch["cu_seqlens_q"].dtype == torch.int32 and "attention_mask" not in batch
    singles = [build_sequence([(s, packed.sources[s].sample(i, 56, 160))], 160, tokenizer.pad_id, 56)
               for members in plan(packed) for s, i in members]
    unpacked = TrainingSequences.collate_fn(singles)
    assert "cu_seqlens_q" not in unpacked
    segments = torch.stack([item["segment_ids"] for item in items])
    block_diagonal = segments[:, :, None] == segments[:, None, :]
    masked = ~(block_diagonal & torch.ones(160, 160, dtype=torch.bool).tril()).unsqueeze(1)  # True = masked out
    got, expected = per_sample_losses(model, batch), per_sample_losses(model, unpacked)
    with_mask = per_sample_losses(model, batch, attention_mask=masked)
    assert len(got) == len(expected) == len(with_mask) == sum(len(m) for m in plan(packed))
    print(f"{len(got)} samples: THD vs one per row {(torch.tensor(got) - torch.tensor(expected)).abs().max():.2e}, "
          f"vs block-diagonal mask {(torch.tensor(got) - torch.tensor(with_mask)).abs().max():.2e}")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(with_mask), rtol=1e-5, atol=1e-5)
    # Positions restart per sample; labels never cross into the next sample.
    first = packed[0]
    starts = [0]
    for length in (member.tokens for member in first["samples"]):
        starts.append(starts[-1] + length)
    for start, end in zip(starts, starts[1:]):
        assert first["position_ids"][:, start].tolist() == [0, 0, 0]
        assert first["loss_mask"][end - 1] == 0


def token_shares(data: TrainingSequences, count: int | None = None) -> list[float]:
    """Each source's share of the tokens in the first ``count`` sequences of the plan (56-pixel views)."""
    tokens = [0] * len(data.sources)
    for members in plan(data, count):
        for source, index in members:
            tokens[source] += min(data._sample(source, index, 56).num_tokens, data.seq_length)
    return [t / sum(tokens) for t in tokens]


def test_packing_fills_the_room_and_places_every_sample_once(shards, tokenizer):
    """First fit: a sample too long for a sequence's room waits for a later one while later samples fill the
    room; none is lost, none placed twice (the placed and the waiting are exactly the samples drawn)."""
    for pack in (False, True):
        data = TrainingSequences(sources(shards, tokenizer), [0.7, 0.3], tokenizer, 160, 64, 56, pack=pack, seed=3)
        used = sum(length for members in (data[i]["samples"] for i in range(64)) for length in (m.tokens for m in members))
        print(f"pack={pack}: {used / (64 * 160):.1%} of positions hold sample tokens")
    assert used / (64 * 160) > 0.9  # in-order packing (stop at the first misfit): 82%
    placed = [member for members in plan(data) for member in members]
    assert len(set(placed)) == len(placed)
    stream, replay = data._stream, MixtureStream(data.sources, data._stream.shares, 3)
    drawn = []
    for source, taken in enumerate(stream.taken):
        for k in range(taken):
            replay.taken[source] = k
            drawn.append((source, replay._index(source)))
    assert sorted(placed + data._pending) == sorted(drawn) and len(data._pending) <= PACK_LOOKAHEAD


def test_mixing_hits_the_token_share(shards, tokenizer):
    """Stage 2's 70:30 vision-language : text, measured in tokens over 1000 batches of 4."""
    data = TrainingSequences(sources(shards, tokenizer), [0.7, 0.3], tokenizer, 160, 4000, 56, seed=5)
    share = token_shares(data)[0]
    print(f"vision-language share {share:.4f} over 1000 batches")
    assert abs(share - 0.7) < 0.02
    # Deterministic by seed, and a different seed gives a different order.
    assert plan(TrainingSequences(sources(shards, tokenizer), [0.7, 0.3], tokenizer, 160, 50, 56, seed=5)) == plan(data, 50)
    assert plan(TrainingSequences(sources(shards, tokenizer), [0.7, 0.3], tokenizer, 160, 50, 56, seed=6)) != plan(data, 50)
    # The plan grows on demand: asking for a late sequence first (a resume) gives what the in-order run gives.
    late = TrainingSequences(sources(shards, tokenizer), [0.7, 0.3], tokenizer, 160, 4000, 56, seed=5)
    assert late.members(3999) == data.members(3999) and plan(late, 50) == plan(data, 50)
    with pytest.raises(IndexError):
        late.members(4000)
    batch = TrainingSequences.collate_fn([data[i] for i in range(8)])
    keys = [member.key for sequence in batch["samples"] for member in sequence]
    assert sum(k.startswith("text_") for k in keys) >= 1 and sum(not k.startswith("text_") for k in keys) >= 1


def test_chat_ratio_mixes_the_images_conversations_into_captions(shards, tokenizer, cache_dir):
    """dataset.chat_ratio=0.3 beside text_ratio=0.3: captions, conversations of the same records and text at
    0.49 : 0.21 : 0.3 of the tokens; a conversation sample carries loss on its answers only."""
    from nemo_pixellm.data.provider import PixelLMDataConfig
    from nemo_pixellm.data.sources import train_dataset

    config = PixelLMDataConfig(path=str(shards / "vl"), text_path=str(shards / "text"), text_ratio=0.3,
                               chat_ratio=0.3, seq_length=160, image_size=56, max_tiles=1, seed=5,
                               cache_dir=str(cache_dir))
    data = train_dataset(config, tokenizer, 2000)
    assert [s.task for s in data.sources] == ["caption", "chat", "text"]
    shares = token_shares(data, 500)
    print(f"caption : chat : text token shares {shares[0]:.3f} : {shares[1]:.3f} : {shares[2]:.3f}")
    assert all(abs(a - b) < 0.02 for a, b in zip(shares, [0.49, 0.21, 0.3]))
    chat = next(data[i] for i in range(40) if any(m.source == 1 for m in data[i]["samples"]))
    answers = tokenizer.decode(chat["labels"][chat["loss_mask"] > 0].tolist())
    assert "?" not in answers and "<|user|>" not in answers  # loss on the assistant's turns alone


def test_resume_reaches_its_position_from_the_cached_plan(shards, tokenizer, tmp_path):
    """A resumed run starts from the cached start of its block of the plan instead of replaying every
    sequence before it; the members are the in-order run's, and a corrupt or foreign cache changes nothing."""
    def sequences(seed=5, cache=tmp_path / "plans"):
        data = TrainingSequences(sources(shards, tokenizer), [0.7, 0.3], tokenizer, 160, 1000, 56, pack=True,
                                 seed=seed, plan_cache=cache, plan_block=50)
        reads, read = [], data._sample
        data._sample = lambda *args: reads.append(args) or read(*args)
        return data, reads

    first, first_reads = sequences()
    in_order = plan(first)  # writes the start of every block
    resumed, reads = sequences()
    assert resumed.members(975) == in_order[975] and len(resumed._block_plan) == 50
    assert 0 < len(reads) < len(first_reads) / 10  # one block of 50 sequences replayed, not 975
    assert plan(resumed) == in_order

    uncached, uncached_reads = sequences(cache=None)
    assert uncached.members(975) == in_order[975] and len(uncached_reads) > 0.9 * len(first_reads)

    # A corrupt block start is replayed from the one before it.
    (next((tmp_path / "plans").iterdir()) / "start-00000019.json").write_text("{garbage")
    repaired, repaired_reads = sequences()
    assert repaired.members(975) == in_order[975] and len(repaired_reads) < len(first_reads) / 5

    # Another seed keeps its own cache and its own plan.
    other, _ = sequences(seed=6)
    assert other.members(975) == sequences(seed=6, cache=None)[0].members(975) != in_order[975]
    assert len(list((tmp_path / "plans").iterdir())) == 2


def test_chat_template_masks_all_but_assistant_tokens(tokenizer):
    turns = [{"from": "system", "value": "Answer briefly."},
             {"from": "human", "value": "Look: <image>\nHow many circles?"}, {"from": "gpt", "value": "three"},
             {"from": "human", "value": "What colour are they?"}, {"from": "gpt", "value": "red"}]
    from nemo_pixellm.tiling import ImageLayout

    layout = ImageLayout(grid=(0, 0), side=2)
    segments = chat_segments(tokenizer, turns, [ImageSegment(layout, tokenizer.image_id)])
    image = [s for s in segments if isinstance(s, ImageSegment)]
    assert len(image) == 1 and all(isinstance(s, TextSegment) for s in segments if s is not image[0])
    ids = [t for s in segments for t in ([s.token_id] * s.tokens if s is image[0] else s.ids)]
    carries = [c for s in segments for c in ([0.0] * s.tokens if s is image[0] else [float(s.carries_loss)] * s.tokens)]
    assert ids[0] == tokenizer.system_id and ids.count(tokenizer.user_id) == 2 and ids.count(tokenizer.assistant_id) == 2
    assert tokenizer.decode([t for t, c in zip(ids, carries) if c]) == " three red"
    assert [t for t, c in zip(ids, carries) if c].count(tokenizer.eos_id) == 2
    image_at = ids.index(tokenizer.image_id)
    assert tokenizer.decode(ids[:image_at]).strip() == "Answer briefly. Look:"  # the image where <image> stood
    assert ids.count(tokenizer.image_id) == layout.tokens and not any(c for t, c in zip(ids, carries) if t == tokenizer.image_id)


def test_bad_records_are_skipped_counted_and_the_plan_stays_deterministic(tokenizer, tmp_path):
    """A malformed JSON, a corrupt, a missing and a truncated image, a tar cut short and an empty shard: the plan
    skips each bad record where it meets it and reports it with that sequence; the same config plans the same,
    from the start or from the cached block starts; a record whose pixels fail is dropped when its sequence is
    built; too many bad records stop the run naming dataset.max_bad_fraction."""
    from conftest import write_damaged_shards
    from nemo_pixellm.data.dataset import BadDataError

    damaged = write_damaged_shards(tmp_path / "bad")
    bad = {i for kind, ids in damaged.items() if kind != "pixels" for i in ids}

    def dataset(**kw):
        return TrainingSequences([ShardSamples(tmp_path / "bad", tokenizer, "caption", max_tiles=1)], [1.0], tokenizer,
                                 160, 42, 56, max_bad_fraction=0.5, plan_block=8, **kw)

    data = dataset(plan_cache=tmp_path / "plans")
    planned = [(data.members(i), data.skipped(i)) for i in range(42)]  # 42 > 41 good: one whole epoch is read
    first_epoch = [r for _, skipped in planned for r in skipped if r["index"] < 60]
    assert sorted(r["index"] for r in first_epoch) == sorted(bad)  # each bad record met once, none else
    reasons = {r["index"]: r["reason"] for r in first_epoch}
    print({kind: reasons[ids[0]] for kind, ids in damaged.items() if kind != "pixels"})
    assert "malformed record" in reasons[3] and "corrupt image" in reasons[5] and "missing image" in reasons[7]
    assert "truncated JPEG image" in reasons[12]
    assert all("shard-000002.tar" in reasons[i] for i in damaged["truncated_tar"])
    assert all("shard-000003.tar" in reasons[i] for i in damaged["empty_shard"])
    assert not {i % 60 for members, _ in planned for _, i in members} & bad
    fresh = dataset()
    assert [(fresh.members(i), fresh.skipped(i)) for i in range(42)] == planned
    resumed = dataset(plan_cache=tmp_path / "plans")  # starts at sequence 30 from the cached block start
    assert [(resumed.members(i), resumed.skipped(i)) for i in range(30, 42)] == planned[30:]
    sequence = next(i for i, (members, _) in enumerate(planned) if (0, 45) in members)
    item = data[sequence]
    assert [r["index"] for r in item["skipped"]][-1] == 45 and "corrupt image" in item["skipped"][-1]["reason"]
    assert item["samples"] == [] and item["loss_mask"].sum() == 0  # its only sample was dropped

    strict = TrainingSequences([ShardSamples(tmp_path / "bad", tokenizer, "caption", max_tiles=1)], [1.0], tokenizer,
                               160, 42, 56, max_bad_fraction=0.05)
    with pytest.raises(BadDataError, match="6 bad records in the first .* more than dataset.max_bad_fraction=0.05"):
        [strict.members(i) for i in range(42)]


def test_shards_with_unsafe_member_names_are_refused(tmp_path):
    import io
    import json
    import tarfile

    from nemo_pixellm.data.shards import MANIFEST, ShardReader

    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:
        info = tarfile.TarInfo("../outside.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    (tmp_path / MANIFEST).write_text(json.dumps({"samples": 1, "shards": [{"name": "shard-000000.tar", "samples": 1}]}))
    with pytest.raises(ValueError, match="tar member '../outside.json' is an absolute or '..' path"):
        ShardReader(tmp_path)[0]


def test_three_image_record_is_untiled_through_the_data_path_and_the_model(tokenizer, model, tmp_path):
    """A data_prep.vqa record with three images: each becomes one untiled image (DeepSeek-VL2 with 3+ images:
    the global view and a single 1x1 local view), placed before the question in record order; a two-image
    record is still tiled by the rule. The sample's prompt is the inference layout of the same request, and the
    model's logits over it in a training batch equal its logits on that request."""
    import io
    import json

    from PIL import Image

    from data_prep import vqa
    from nemo_pixellm import tiling
    from nemo_pixellm.generate import prompt_from_request
    from nemo_pixellm.prompts import prompt_from_sample

    sizes = {"wide.png": (90, 40), "tall.png": (40, 90), "square.png": (56, 56)}
    for seed, (name, (w, h)) in enumerate(sizes.items()):
        pixels = torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(tmp_path / name)
    rows = [{"images": list(sizes), "question": "Which one is square?", "answer": "the third"},
            {"images": ["wide.png", "tall.png"], "question": "Which one is wide?", "answer": "the first"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    vqa.main(["--input", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "shards")])
    samples = ShardSamples(tmp_path / "shards", tokenizer, "vqa", max_tiles=4)
    layout = dict(tile=56, patch=14, downsample=2)

    three, two = samples.sample(0, 56, 160), samples.sample(1, 56, 160)
    grids = [[s.layout.grid for s in sample.segments if isinstance(s, ImageSegment)] for sample in (three, two)]
    assert grids == [[(1, 1)] * 3, [tiling.best_grid(90, 40, 56, 4), tiling.best_grid(40, 90, 56, 4)]]
    assert grids[1] == [(2, 1), (1, 2)]  # tiled by the aspect ratio
    ids, _, _, views, _ = three.flatten(160)
    untiled = tiling.image_layout(56, 56, **layout, max_tiles=1)
    assert len(views) == 3 * 2 and ids.count(tokenizer.image_id) == 3 * untiled.tokens == 39
    first_text = next(i for i, t in enumerate(ids) if t not in (tokenizer.user_id, tokenizer.image_id))
    assert ids[1:first_text] == [tokenizer.image_id] * 39  # the images, then the question

    record = samples.reader[0]
    pictures = [Image.open(io.BytesIO(record[m])) for m in ("jpg", "1.jpg", "2.jpg")]
    config = type("Layout", (), dict(image_size=56, patch_size=14, downsample=2, max_tiles=4))
    request = prompt_from_request(tokenizer, "Which one is square?", pictures, config)
    prompt = prompt_from_sample(three)
    assert prompt.tokens == request.tokens and prompt.blocks == request.blocks
    assert torch.equal(prompt.views, request.views) and torch.equal(prompt.grids, request.grids)

    batch = TrainingSequences.collate_fn([build_sequence([(0, three)], 160, tokenizer.pad_id, 56)])
    # Training batches carry the views as uint8 pixels (a quarter of the bytes); the model normalises them.
    assert batch["images"].dtype == torch.uint8 and torch.equal(tiling.normalise(batch["images"]), request.views)
    n = len(request.tokens)
    with torch.no_grad():
        trained = model(batch["tokens"], batch["position_ids"], images=batch["images"], image_grids=batch["image_grids"])
        asked = model(torch.tensor([request.tokens]), tiling.mrope_positions(request.blocks)[:, None],
                      images=request.views, image_grids=request.grids)
    torch.testing.assert_close(trained[:, :n], asked, rtol=1e-5, atol=1e-5)
