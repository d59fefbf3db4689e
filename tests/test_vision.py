"""The vision system against its definitions (reference.md section 3) and against code nobody here wrote:
DeepSeek-VL2 tiling and token layout, Qwen2-VL's M-RoPE ids, Hugging Face SigLIP's patch features,
and images reaching exactly their own sample in a mixed batch."""

import json
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nemo_pixellm import tiling
from nemo_pixellm.tiling import pixel_unshuffle

from conftest import TINY_LM, TINY_VISION_56, build_pixellm

REFERENCE_SIZES = [(5000, 300), (300, 5000), (20, 20), (12000, 9000), (1000, 1000), (1152, 768), (640, 480),
                   (800, 1200), (384, 1500), (1700, 900), (390, 390), (3000, 100)]


def reference_tokens(cols: int, rows: int) -> int:
    """reference.md: global 14 x (14 + 1), one separator, local mosaic (rows * 14) x (cols * 14 + 1)."""
    return 14 * 15 + 1 + (rows * 14) * (cols * 14 + 1)


def test_token_counts_follow_deepseek_vl2(capsys):
    tiling.main(["384x384", "1152x768", "1152x1152", "2000x1500", "--max-tiles", "9"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["grid"] for r in rows] == [[1, 1], [3, 2], [3, 3], [3, 3]]
    assert [r["tokens"] for r in rows] == [421, 1415, 2017, 2017]
    assert all(r["tokens"] == reference_tokens(*r["grid"]) for r in rows)
    assert [r["tiles"] for r in rows] == [1, 6, 9, 9]


def independent_best_grid(width: int, height: int, tile: int = 384, max_tiles: int = 9) -> tuple[int, int]:
    """The anyres rule in exact arithmetic: rank every grid by (effective resolution desc, waste asc)."""
    ranked = []
    for cols in range(1, max_tiles + 1):
        for rows in range(1, max_tiles + 1):
            if cols * rows > max_tiles:
                continue
            W, H = cols * tile, rows * tile
            scale = min(Fraction(W, width), Fraction(H, height))
            effective = min((width * scale).__floor__() * (height * scale).__floor__(), width * height)
            ranked.append((-effective, W * H - effective, (cols, rows)))
    best = min(r[:2] for r in ranked)
    return next(r[2] for r in ranked if r[:2] == best)  # first of exact ties, in (cols, rows) order


@pytest.mark.parametrize("size", REFERENCE_SIZES)
def test_grid_choice_matches_the_rule(size):
    assert tiling.best_grid(*size) == independent_best_grid(*size)


def test_grid_choice_spread():
    grids = {size: tiling.best_grid(*size) for size in REFERENCE_SIZES}
    assert grids[(5000, 300)] == (9, 1) and grids[(300, 5000)] == (1, 9)  # very wide / very tall: one strip
    assert grids[(20, 20)] == (1, 1) and grids[(12000, 9000)] == (3, 3)  # tiny / huge
    assert grids[(1000, 1000)] == (3, 3) and grids[(1152, 768)] == (3, 2)


def test_three_images_turn_tiling_off_and_global_only_mode():
    assert tiling.image_layout(2000, 1500, images_in_sample=3).grid == (1, 1)
    assert tiling.image_layout(2000, 1500, images_in_sample=3).tokens == 421
    assert tiling.image_layout(2000, 1500, max_tiles=0).tokens == 14 * 15


def test_views_are_letterboxed_global_then_row_major_tiles():
    left, right = (200, 30, 30), (30, 30, 200)
    image = Image.new("RGB", (64, 16), left)
    image.paste(Image.new("RGB", (32, 16), right), (32, 0))
    layout = tiling.image_layout(64, 16, tile=32, patch=8, downsample=2, max_tiles=4)
    assert layout.grid == (2, 1)
    views = [torch.tensor(list(v.getdata())).view(32, 32, 3) for v in tiling.tile_image(image, layout, tile=32)]
    assert len(views) == 3
    glob = views[0]  # 64x16 letterboxed into 32x32: content rows 12..19, mean-colour bands above and below
    assert (glob[:12] == torch.tensor(tiling.MEAN_RGB)).all() and (glob[20:] == torch.tensor(tiling.MEAN_RGB)).all()
    assert (glob[14, 2] - torch.tensor(left)).abs().max() <= 8 and (glob[14, 29] - torch.tensor(right)).abs().max() <= 8
    # Local mosaic 64x32 (2 tiles): content rows 8..23 between mean bands; tile 0 the left half, tile 1 the right.
    assert (views[1][:8] == torch.tensor(tiling.MEAN_RGB)).all() and (views[2][24:] == torch.tensor(tiling.MEAN_RGB)).all()
    assert (views[1][9:23, :30] - torch.tensor(left)).abs().max() <= 8
    assert (views[2][9:23, 2:] - torch.tensor(right)).abs().max() <= 8


def test_layout_positions_newline_and_separator():
    """Views as token grids (newline = one more column), separator as one text token, text continues after."""
    layout = tiling.image_layout(32, 32, tile=32, patch=8, downsample=2, max_tiles=1)  # s = 2, grid 1x1
    ids = tiling.mrope_positions([tiling.TextBlock(2)] + layout.blocks + [tiling.TextBlock(1)])
    expected_global = [[2] * 6, [2, 2, 2, 3, 3, 3], [2, 3, 4, 2, 3, 4]]  # 2 rows x (2 + newline) at start 2
    assert ids[:, :2].tolist() == [[0, 1]] * 3
    assert ids[:, 2:8].tolist() == expected_global
    assert ids[:, 8].tolist() == [5, 5, 5]  # separator: max (4) + 1
    assert ids[:, 9:15].tolist() == [[6] * 6, [6, 6, 6, 7, 7, 7], [6, 7, 8, 6, 7, 8]]
    assert ids[:, 15].tolist() == [9, 9, 9]
    assert ids.shape[1] == 2 + layout.tokens + 1


def test_mrope_ids_match_qwen2_vl_get_rope_index():
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    config = Qwen2VLConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": 64,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "spatial_merge_size": 2},
    )
    model = Qwen2VLModel(config)
    for patches_h, patches_w, before, after in [(8, 12, 5, 7), (28, 28, 1, 3), (6, 2, 9, 0)]:
        rows, cols = patches_h // 2, patches_w // 2  # after the 2x2 merge, like our pixel-unshuffle
        n = before + rows * cols + after
        token_type = torch.zeros(1, n, dtype=torch.int)
        token_type[0, before:before + rows * cols] = 1
        theirs, _ = model.get_rope_index(torch.zeros(1, n, dtype=torch.long), token_type,
                                         image_grid_thw=torch.tensor([[1, patches_h, patches_w]]))
        ours = tiling.mrope_positions([tiling.TextBlock(before), tiling.GridBlock(rows, cols), tiling.TextBlock(after)])
        assert torch.equal(theirs[:, 0], ours)


def test_pixel_unshuffle_matches_torch_up_to_channel_order():
    x = torch.randn(2, 6, 4, 3)  # [n, h, w, c]
    ours = pixel_unshuffle(x, 2)  # channels ordered (dy, dx, c)
    ref = F.pixel_unshuffle(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)  # channels ordered (c, dy, dx)
    ref = ref.reshape(2, 3, 2, 3, 2, 2).permute(0, 1, 2, 4, 5, 3).reshape(2, 3, 2, 12)
    assert torch.equal(ours, ref)
    odd = pixel_unshuffle(torch.randn(1, 27, 27, 3), 2)
    assert odd.shape == (1, 14, 14, 12)


@pytest.fixture(scope="module")
def vision_model(megatron_single_process):
    """A tiny PixelLM whose views are 56 px (4x4 patches -> 2x2 tokens + newline per row)."""
    return build_pixellm(megatron_single_process, **TINY_LM, **TINY_VISION_56, vocab_size=256, seq_length=128,
                         image_token_id=5)


def test_projector_lays_out_global_separator_and_mosaic(vision_model):
    projector = vision_model.projector
    g = torch.Generator().manual_seed(3)
    features = torch.randn(1 + 6, 4, 4, 32, generator=g)  # one image, grid 3 cols x 2 rows, 4x4 patches per view
    with torch.no_grad():
        views = projector.project(features)  # [7, 2, 2, hidden]
        out = projector(features, torch.tensor([[3, 2]]))
    s, cols, rows = 2, 3, 2
    newline, sep = projector.image_newline, projector.view_separator
    expected = [views[0, r, c] if c < s else newline for r in range(s) for c in range(s + 1)] + [sep]
    for r in range(rows * s):  # mosaic row r, column c: tile (r // s) * cols + c // s, inside (r % s, c % s)
        for c in range(cols * s + 1):
            expected.append(newline if c == cols * s else views[1 + (r // s) * cols + c // s, r % s, c % s])
    assert out.shape[0] == reference_tokens_small(cols, rows, s) == len(expected)
    torch.testing.assert_close(out, torch.stack(expected), rtol=0, atol=0)


def test_projector_lays_out_global_views_of_several_images(vision_model):
    """Images without tiles (the tiny variant's scenes), alone and after a tiled one: each view's rows in order,
    a newline after every row, the images one after the other."""
    projector = vision_model.projector
    features = torch.randn(5, 4, 4, 32, generator=torch.Generator().manual_seed(4))
    newline, s = projector.image_newline, 2
    cases = [([[0, 0]] * 3, 3, range(3), 0),  # three untiled images: views 0-2
             # a 2 x 1 grid (global view + 2 tiles: views 0-2) before two untiled images (views 3, 4)
             ([[2, 1], [0, 0], [0, 0]], 5, range(3, 5), reference_tokens_small(2, 1, s))]
    for grids, view_count, untiled, tiled_tokens in cases:
        with torch.no_grad():
            views = projector.project(features[:view_count])
            out = projector(features[:view_count], torch.tensor(grids))
        expected = [views[v, r, c] if c < s else newline for v in untiled for r in range(s) for c in range(s + 1)]
        assert out.shape[0] == tiled_tokens + len(expected)
        torch.testing.assert_close(out[tiled_tokens:], torch.stack(expected), rtol=0, atol=0)


def test_position_code_carries_every_token_s_place_whatever_the_tower_gives(vision_model):
    """Issue 20: a linear probe reads each token's row and column from the projector output on views it was not
    fitted on, at chance without the code when the tower's features hold no place (noise here), exactly with it."""
    projector = vision_model.projector
    g = torch.Generator().manual_seed(5)
    features = torch.randn(120, 8, 8, 32, generator=g)  # 4x4 tokens per view, no place in the features
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    labels = (rows.reshape(-1).repeat(120), cols.reshape(-1).repeat(120))

    def probe_accuracy(tokens: torch.Tensor, y: torch.Tensor) -> float:
        x = tokens.reshape(-1, tokens.shape[-1])
        x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
        train, test = slice(0, 80 * 16), slice(80 * 16, None)
        probe = torch.nn.Linear(x.shape[1], 4)
        optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(probe(x[train]), y[train]) + 1e-3 * probe.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return (probe(x[test]).argmax(-1) == y[test]).float().mean().item()

    was = projector.position_code
    try:
        accuracy = {}
        for on in (False, True):
            projector.position_code = on
            with torch.no_grad():
                tokens = projector.project(features)
            accuracy[on] = [probe_accuracy(tokens.detach(), y) for y in labels]
    finally:
        projector.position_code = was
    assert max(accuracy[False]) < 0.4, accuracy  # chance is 0.25
    assert min(accuracy[True]) == 1.0, accuracy
    code = tiling.view_position_code(4, 4, tiling.POSITION_CODE_CHANNELS)
    assert (code[:, :2, 12] > 0).all() and (code[:, 2:, 12] < 0).all()  # the slowest column cosine: left vs right
    assert (code[:2, :, 4] > 0).all() and (code[2:, :, 4] < 0).all()  # the slowest row cosine: top vs bottom


def test_position_code_has_channels_of_its_own():
    """The code replaces the last channels only (what a token shows stays whole in the others), at their RMS."""
    g = torch.Generator().manual_seed(6)
    views = torch.randn(3, 4, 4, 64, generator=g) * 5.0
    out = tiling.with_position_code(views)
    k = tiling.POSITION_CODE_CHANNELS
    torch.testing.assert_close(out[..., :-k], views[..., :-k], rtol=0, atol=0)
    rms = views[..., :-k].pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(out[..., -k:], tiling.view_position_code(4, 4, k) * rms)
    with pytest.raises(ValueError, match="image_position_code=false"):
        tiling.with_position_code(torch.randn(1, 4, 4, 32))


def reference_tokens_small(cols: int, rows: int, s: int) -> int:
    return s * (s + 1) + 1 + rows * s * (cols * s + 1)


def _mixed_batch(grid_a, grid_b, generator):
    """Sample 0: two images (grids a, b); sample 1: text only; sample 2: one image (grid b)."""
    tokens_a = tiling.ImageLayout(grid=grid_a, side=2).tokens
    tokens_b = tiling.ImageLayout(grid=grid_b, side=2).tokens
    ids = torch.randint(10, 256, (3, 128), generator=generator)
    ids[0, 3:3 + tokens_a] = 5
    ids[0, 40:40 + tokens_b] = 5
    ids[2, 20:20 + tokens_b] = 5
    views = lambda grid: torch.rand(1 + grid[0] * grid[1], 3, 56, 56, generator=generator) * 2 - 1  # noqa: E731
    return ids, views(grid_a), views(grid_b), views(grid_b)


def test_each_sample_sees_only_its_own_images(vision_model):
    """The upstream bug gave every sample sample 0's image. Swapping sample 0's second image with sample 2's
    image changes exactly those two samples' logits (and only after the image), never the text-only sample."""
    g = torch.Generator().manual_seed(4)
    ids, a, b0, b2 = _mixed_batch((2, 1), (1, 1), g)
    grids = torch.tensor([[2, 1], [1, 1], [1, 1]])
    positions = torch.arange(128).expand(3, 3, -1)  # [3, b, s]
    with torch.no_grad():
        base = vision_model(ids, positions, images=torch.cat([a, b0, b2]), image_grids=grids)
        swapped = vision_model(ids, positions, images=torch.cat([a, b2, b0]), image_grids=grids)
    delta = (base - swapped).abs().amax(dim=-1)  # [b, s]
    assert delta[0].max() > 1e-4 and delta[2].max() > 1e-4
    assert delta[1].max() == 0
    assert delta[0, :40].max() == 0 and delta[2, :20].max() == 0  # causal: nothing before the swapped image moves


def test_batched_equals_one_by_one(vision_model):
    g = torch.Generator().manual_seed(5)
    ids, a, b0, b2 = _mixed_batch((1, 2), (0, 0), g)
    grids = torch.tensor([[1, 2], [0, 0], [0, 0]])
    positions = torch.arange(128).expand(3, 3, -1)
    with torch.no_grad():
        together = vision_model(ids, positions, images=torch.cat([a, b0, b2]), image_grids=grids)
        apart = [vision_model(ids[:1], positions[:, :1], images=torch.cat([a, b0]), image_grids=grids[:2]),
                 vision_model(ids[1:2], positions[:, :1]),
                 vision_model(ids[2:], positions[:, :1], images=b2, image_grids=grids[2:])]
    for i, single in enumerate(apart):
        torch.testing.assert_close(together[i], single[0], rtol=1e-5, atol=1e-5)


def test_image_token_count_mismatch_is_an_error(vision_model):
    ids = torch.full((1, 128), 11)
    ids[0, 3:3 + 5] = 5  # a global-only 56 px view needs 6 positions
    with pytest.raises(ValueError, match="image-token positions"):
        vision_model(ids, torch.arange(128)[None], images=torch.zeros(1, 3, 56, 56))


def _random_siglip(tmp_path, image_size=56):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=14, attention_dropout=0.0)
    model = SiglipVisionModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases away from their 1 / 0 init, so every weight matters
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path)
    return model


def test_siglip_import_matches_transformers(megatron_single_process, tmp_path):
    hf = _random_siglip(tmp_path)
    model = build_pixellm(megatron_single_process, **TINY_LM, **TINY_VISION_56, vocab_size=256, seq_length=64,
                          image_token_id=5, vision_pretrained_path=str(tmp_path))
    g = torch.Generator().manual_seed(6)
    for size in (56, 112):  # the native grid, then an interpolated position table (progressive resolution)
        pixels = torch.rand(2, 3, size, size, generator=g) * 2 - 1
        with torch.no_grad():
            theirs = hf(pixel_values=pixels, interpolate_pos_encoding=size != 56).last_hidden_state
            ours = model.vision_model(pixels)  # [n, gh, gw, c]
        torch.testing.assert_close(ours.reshape(2, -1, 32), theirs, rtol=1e-5, atol=1e-5)


def test_siglip_import_rejects_a_mismatched_tower(megatron_single_process, tmp_path):
    _random_siglip(tmp_path, image_size=84)
    with pytest.raises(ValueError, match="model.vision_image_size=56 but .* has image_size=84"):
        build_pixellm(megatron_single_process, **TINY_LM, **TINY_VISION_56, vocab_size=256, seq_length=64,
                      image_token_id=5, vision_pretrained_path=str(tmp_path))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Two samples with non-square images (wide and tall) and captions, as webdataset shards."""
    import io

    from nemo_pixellm.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    records = []
    for i, size in enumerate([(600, 200), (150, 400)]):
        buf = io.BytesIO()
        Image.new("RGB", size, (40 * i, 90, 160)).save(buf, format="JPEG")
        meta = {"caption": f"a picture number {i}", "qa": [{"type": "colour", "q": "What colour?", "a": "blue"}]}
        records.append({"__key__": f"s{i}", "jpg": buf.getvalue(), "json": json.dumps(meta).encode()})
    write_shards(records, out, shard_size=10)
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from nemo_pixellm.data.tokenizer import train_bpe

    return train_bpe(["a picture number 0 1", "What colour? blue"], 300, tmp_path_factory.mktemp("tok") / "t.json")


def _sequences(shard_dir, tokenizer, task, **kwargs):
    from nemo_pixellm.data.dataset import TrainingSequences
    from nemo_pixellm.data.samples import ShardSamples

    samples = ShardSamples(shard_dir, tokenizer, task, patch_size=14, downsample=2, max_tiles=kwargs.pop("max_tiles"))
    return TrainingSequences([samples], [1.0], tokenizer, kwargs.pop("seq_length"), kwargs.pop("num_samples", None),
                             kwargs.pop("image_size"), **kwargs)


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_dataset_tiles_places_and_masks(shard_dir, tokenizer, vision_model, task):
    from nemo_pixellm.data.dataset import TrainingSequences

    data = _sequences(shard_dir, tokenizer, task, seq_length=128, image_size=56, max_tiles=4)
    samples = [data[0], data[1]]
    for sample in samples:
        i = int(sample["samples"][0].key[1:])  # key "s<i>"
        grid = tiling.best_grid(*[(600, 200), (150, 400)][i], tile=56, max_tiles=4)
        layout = tiling.ImageLayout(grid=grid, side=2)
        assert sample["image_grids"].tolist() == [list(grid)]
        assert sample["images"].shape == (1 + grid[0] * grid[1], 3, 56, 56)
        is_image = sample["tokens"] == tokenizer.image_id
        assert int(is_image.sum()) == layout.tokens
        start = int(is_image.nonzero()[0])
        assert torch.equal(sample["position_ids"][:, start:start + layout.tokens],
                           tiling.mrope_positions(layout.blocks, start=start))
        target = sample["labels"][sample["loss_mask"] > 0].tolist()  # loss only on the caption / answer + end
        assert tokenizer.decode(target) == (f"a picture number {i}" if task == "caption" else " blue")
        assert target[-1] == tokenizer.eos_id
    batch = TrainingSequences.collate_fn(samples)
    ids = torch.where(batch["tokens"] == tokenizer.image_id, 5, batch["tokens"] % 200 + 10)  # the model's ids
    with torch.no_grad():
        vision_model(ids, batch["position_ids"], images=batch["images"], image_grids=batch["image_grids"])


def test_resolution_schedule_switches_by_step(shard_dir, tokenizer):
    schedule = [[0.0, 224], [0.4, 384], [0.8, 512]]
    data = _sequences(shard_dir, tokenizer, "caption", seq_length=384, image_size=224, num_samples=40, max_tiles=0,
                      resolution_schedule=schedule, global_batch_size=4)
    sizes = [data.view_size(i) for i in range(40)]  # 10 steps of 4 samples
    assert sizes == [224] * 16 + [384] * 16 + [512] * 8
    assert data[39]["images"].shape[-1] == 512 and int((data[39]["tokens"] == tokenizer.image_id).sum()) == 18 * 19
