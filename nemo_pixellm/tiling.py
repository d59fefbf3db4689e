"""DeepSeek-VL2 dynamic tiling, and where an image's tokens sit in the LLM sequence (reference.md section 3).

An image becomes a *global* view (the whole image letterboxed to one tile) followed by *local* tiles: the
image resized (padded, aspect kept) to the best-fitting grid of cols x rows tiles, cut row by row.
After the ViT (patch p) and the 2x2 pixel-unshuffle, a tile is an s x s token grid (s = ceil(tile/p / 2);
14 at 384/14) and the image occupies, in order:

    global view   s rows of (s + 1): each row ends with the learned newline token
    separator     1 learned view-separator token
    local mosaic  rows*s rows of (cols*s + 1): the tiles side by side, each mosaic row ends with a newline

1x1 -> 210 + 1 + 210 = 421 positions; 2 rows x 3 cols -> 210 + 1 + 28*43 = 1415; 3x3 -> 2017.
With 3 or more images in a sample tiling is off: grid 1x1 (DeepSeek-VL2's processor then still emits the
global view and one local tile). ``max_tiles=0`` is this plugin's cheaper mode: the global view alone.

M-RoPE positions (Qwen2-VL's rule, extended to the newline and separator tokens): text tokens take
t = h = w = running index; a view's token grid takes t = start, h = start + row, w = start + col, where a
newline is the column after the last (col = s, resp. cols*s); the separator is a one-token text block;
whatever follows continues at max(previous ids) + 1.

    python -m nemo_pixellm.tiling 2000x1500 640x480 [--tile 384 --patch 14 --max-tiles 9 --images 1]
"""

import argparse
import functools
import json
import math
from dataclasses import dataclass

import torch
from PIL import Image, ImageOps

TILE, PATCH, DOWNSAMPLE, MAX_TILES = 384, 14, 2, 9
MEAN_RGB = (127, 127, 127)  # SigLIP normalises with mean 0.5: padding is the mean colour, zero after normalisation


def candidate_grids(max_tiles: int = MAX_TILES) -> list[tuple[int, int]]:
    """Every (cols, rows) with cols * rows <= max_tiles (cols outer, rows inner: the first of exact ties wins)."""
    return [(cols, rows) for cols in range(1, max_tiles + 1) for rows in range(1, max_tiles // cols + 1)]


def best_grid(width: int, height: int, tile: int = TILE, max_tiles: int = MAX_TILES) -> tuple[int, int]:
    """LLaVA-NeXT "anyres" choice: maximise the effective resolution, then minimise the wasted area."""
    best, best_effective, best_waste = (1, 1), -1, math.inf
    for cols, rows in candidate_grids(max_tiles):
        grid_w, grid_h = cols * tile, rows * tile
        scale = min(grid_w / width, grid_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = grid_w * grid_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cols, rows), effective, waste
    return best


def view_side(tile: int = TILE, patch: int = PATCH, downsample: int = DOWNSAMPLE) -> int:
    """Tokens per side of one view after the pixel-unshuffle (27 patches at 384/14 -> padded 28 -> 14)."""
    return math.ceil((tile // patch) / downsample)


@dataclass(frozen=True)
class TextBlock:
    """``length`` consecutive text positions: t = h = w, one more per token."""

    length: int

    @property
    def tokens(self) -> int:
        return self.length


@dataclass(frozen=True)
class GridBlock:
    """A rows x cols grid of image tokens: t fixed, h and w the token's row and column."""

    rows: int
    cols: int

    @property
    def tokens(self) -> int:
        return self.rows * self.cols


Block = TextBlock | GridBlock


@dataclass(frozen=True)
class ImageLayout:
    """How one image is cut (``grid`` = (cols, rows) of local tiles; (0, 0) = global view only) and the
    token blocks it fills: a GridBlock per view group (cols include the newline column), a one-token TextBlock
    for the separator."""

    grid: tuple[int, int]
    side: int

    @property
    def views(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    @property
    def blocks(self) -> list[Block]:
        s, (cols, rows) = self.side, self.grid
        blocks = [GridBlock(s, s + 1)]
        if cols * rows:
            blocks += [TextBlock(1), GridBlock(rows * s, cols * s + 1)]
        return blocks

    @property
    def tokens(self) -> int:
        return sum(b.tokens for b in self.blocks)


def image_layout(width: int, height: int, *, tile: int = TILE, patch: int = PATCH, downsample: int = DOWNSAMPLE,
                 max_tiles: int = MAX_TILES, images_in_sample: int = 1) -> ImageLayout:
    if max_tiles == 0:
        grid = (0, 0)
    elif images_in_sample >= 3:
        grid = (1, 1)  # DeepSeek-VL2 turns tiling off for 3+ images
    else:
        grid = best_grid(width, height, tile, max_tiles)
    return ImageLayout(grid=grid, side=view_side(tile, patch, downsample))


def tile_image(image: Image.Image, layout: ImageLayout, tile: int = TILE) -> list[Image.Image]:
    """The views of one image, in token order: the letterboxed global view, then local tiles row by row."""
    image = image.convert("RGB")
    views = [ImageOps.pad(image, (tile, tile), Image.BICUBIC, color=MEAN_RGB)]
    cols, rows = layout.grid
    if cols * rows:
        mosaic = ImageOps.pad(image, (cols * tile, rows * tile), Image.BICUBIC, color=MEAN_RGB)
        for r in range(rows):
            for c in range(cols):
                views.append(mosaic.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)))
    return views


def to_pixels(view: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] uint8. Views stay uint8 until the model (``normalise``): a quarter of the bytes from
    the data workers and to the GPU, and the conversion runs once per batch instead of once per view."""
    # PIL's band split writes the planes: a third of the time of permuting interleaved RGB bytes in torch
    planes = bytearray(b"".join(band.tobytes() for band in view.split()))
    return torch.frombuffer(planes, dtype=torch.uint8).view(3, view.height, view.width)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 views -> float in [-1, 1] (SigLIP normalisation: mean 0.5, std 0.5); float views pass unchanged.
    In place on the new float tensor: the same numbers as ``/ 127.5 - 1.0`` without two more image-sized buffers."""
    return pixels.float().div_(127.5).sub_(1.0) if pixels.dtype == torch.uint8 else pixels


def pixel_unshuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """[n, h, w, c] -> [n, ceil(h/f), ceil(w/f), c*f*f]; odd grids (27 at 384/14) are zero-padded first."""
    n, h, w, c = features.shape
    pad_h, pad_w = (-h) % factor, (-w) % factor
    if pad_h or pad_w:
        features = torch.nn.functional.pad(features, (0, 0, 0, pad_w, 0, pad_h))
        h, w = h + pad_h, w + pad_w
    features = features.reshape(n, h // factor, factor, w // factor, factor, c)
    return features.permute(0, 1, 3, 2, 4, 5).reshape(n, h // factor, w // factor, factor * factor * c)


def view_position_code(rows: int, cols: int, hidden: int, dtype=torch.float32) -> torch.Tensor:
    """[rows, cols, hidden]: a fixed 2D sin-cos code of each token's place in its view (MAE's 2D code on the
    token's centre as a fraction of the view, so one code serves every view size). A quarter of the channels
    each: sin / cos of the row, sin / cos of the column, at frequencies pi .. 64 pi (left vs right is the
    slowest one's sign); channels left over when hidden is not a multiple of 4 are zero."""
    n = hidden // 4
    freqs = math.pi * 64.0 ** (torch.arange(n, dtype=torch.float64) / max(n - 1, 1))
    y = ((torch.arange(rows, dtype=torch.float64) + 0.5) / rows)[:, None] * freqs  # [rows, n]
    x = ((torch.arange(cols, dtype=torch.float64) + 0.5) / cols)[:, None] * freqs  # [cols, n]
    code = torch.zeros(rows, cols, hidden, dtype=torch.float64)
    code[..., :n], code[..., n:2 * n] = y.sin()[:, None], y.cos()[:, None]
    code[..., 2 * n:3 * n], code[..., 3 * n:4 * n] = x.sin()[None], x.cos()[None]
    return code.to(dtype)


POSITION_CODE_CHANNELS = 16  # the last channels of an image token hold its place (4 frequencies per sin / cos axis)


def with_position_code(views: torch.Tensor) -> torch.Tensor:
    """Projected views [v, rows, cols, hidden] with their last ``POSITION_CODE_CHANNELS`` channels replaced by
    ``view_position_code`` at the RMS of the other channels (not differentiated): the place has channels of its
    own, as loud as the features whatever scale the projector drifts to. Off in the tiny variant: with the code
    (in these channels or added over all of them) the decoder's colour lookup did not form (README, issue 20)."""
    _, rows, cols, hidden = views.shape
    if hidden <= 2 * POSITION_CODE_CHANNELS:
        raise ValueError(f"image_position_code needs a hidden size above {2 * POSITION_CODE_CHANNELS} (its code takes "
                         f"{POSITION_CODE_CHANNELS} channels); this model's is {hidden}: set model.image_position_code=false")
    content = views[..., :hidden - POSITION_CODE_CHANNELS]
    scale = content.detach().pow(2).mean(-1, keepdim=True).sqrt()
    code = view_position_code(rows, cols, POSITION_CODE_CHANNELS, views.dtype).to(views.device)
    return torch.cat([content, code * scale], dim=-1)


def image_token_sequence(views: torch.Tensor, grids: torch.Tensor, newline: torch.Tensor,
                         separator: torch.Tensor) -> torch.Tensor:
    """Projected views [v, s, s, hidden] -> the images' tokens in sequence order [tokens, hidden] (the layout at
    the top of this module). ``grids``: [images, 2] (cols, rows) of local tiles ((0, 0): global view only); the
    views arrive per image as global, then local tiles row by row."""
    side, hidden = views.shape[1], views.shape[-1]
    newline, separator = newline.to(views.dtype).view(1, 1, hidden), separator.to(views.dtype).view(1, hidden)

    def with_newlines(grid):
        return torch.cat([grid, newline.expand(grid.shape[0], 1, hidden)], dim=1).reshape(-1, hidden)

    if not grids.any() and len(grids) == views.shape[0]:  # global views only: every image's newlines in one cat
        return torch.cat([views, newline.expand(*views.shape[:2], 1, hidden)], dim=2).reshape(-1, hidden)
    out, v = [], 0
    for cols, rows in grids.tolist():
        out.append(with_newlines(views[v]))
        if cols * rows:
            tiles = views[v + 1: v + 1 + cols * rows].reshape(rows, cols, side, side, hidden)
            out += [separator, with_newlines(tiles.permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, hidden))]
        v += 1 + cols * rows
    if v != views.shape[0]:
        raise ValueError(f"the image grids account for {v} views but {views.shape[0]} were given")
    return torch.cat(out)


def mrope_positions(blocks: list[Block], start: int = 0) -> torch.Tensor:
    """[3, n] (t, h, w) position ids of a sequence of text and grid blocks."""
    ids, nxt = [], start
    for block in blocks:
        if isinstance(block, TextBlock):
            run = torch.arange(nxt, nxt + block.length)
            ids.append(run.expand(3, -1))
            nxt += block.length
        else:
            rows, cols = block.rows, block.cols
            h = torch.arange(rows).repeat_interleave(cols)
            w = torch.arange(cols).repeat(rows)
            ids.append(torch.stack([torch.zeros_like(h), h, w]) + nxt)
            nxt += max(rows, cols)  # max id of the grid is start + max(rows, cols) - 1
    return torch.cat(ids, dim=1) if ids else torch.zeros(3, 0, dtype=torch.long)


@functools.lru_cache(maxsize=8)
def mrope_axis_per_column(sections: tuple[int, ...], rope_dim: int, interleaved: bool = False,
                           sections_interleaved: bool = False) -> torch.Tensor:
    """Which position axis (0 t, 1 h, 2 w) drives each column of Megatron's rope embedding
    (cat(freqs, freqs), also transformers' layout: column c rotates frequency pair c mod rope_dim/2; with
    ``interleaved`` rotary pairs, LLaMA 4's, columns 2p and 2p + 1 rotate pair p). Frequency pairs go to the axes
    in ``sections`` chunks (Qwen2-VL: t t h h h w w w) or, with ``sections_interleaved``, alternate t h w t h w ..
    (Qwen3-VL: each axis gets high and low frequencies). Cached: read, never written."""
    half = rope_dim // 2
    if sum(sections) != half:
        raise ValueError(f"mrope_section {sections} must sum to the rope half-dimension {half}")
    if sections_interleaved:
        axis = torch.zeros(half, dtype=torch.long)
        for dim, offset in ((1, 1), (2, 2)):  # Qwen3-VL's apply_interleaved_mrope: pairs offset, offset+3, ..
            axis[offset:min(3 * sections[dim], half):3] = dim
        if axis.bincount(minlength=3).tolist() != list(sections):
            raise ValueError(f"mrope_section {list(sections)} cannot be interleaved over {half} frequency pairs "
                             f"(t h w t h w ..): use one that can, for example {interleaved_mrope_section(half)}")
    else:
        axis = torch.repeat_interleave(torch.arange(len(sections)), torch.tensor(sections))
    return axis.repeat_interleave(2) if interleaved else torch.cat([axis, axis])


def interleaved_mrope_section(pairs: int) -> list[int]:
    """The t / h / w pair counts of a full t h w t h w .. interleave of ``pairs`` frequency pairs."""
    return [len(range(axis, pairs, 3)) for axis in range(3)]


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT (for example 2000x1500)") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive")
    return width, height


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="DeepSeek-VL2 tiling: grid, tiles and LLM tokens per image size")
    parser.add_argument("sizes", nargs="+", type=_size, metavar="WIDTHxHEIGHT")
    parser.add_argument("--tile", type=int, default=TILE)
    parser.add_argument("--patch", type=int, default=PATCH)
    parser.add_argument("--downsample", type=int, default=DOWNSAMPLE)
    parser.add_argument("--max-tiles", type=int, default=MAX_TILES, help="m*n <= this (0: global view only)")
    parser.add_argument("--images", type=int, default=1, help="images in the sample (3+ turns tiling off)")
    args = parser.parse_args(argv)
    for width, height in args.sizes:
        layout = image_layout(width, height, tile=args.tile, patch=args.patch, downsample=args.downsample,
                              max_tiles=args.max_tiles, images_in_sample=args.images)
        cols, rows = layout.grid
        print(json.dumps({"size": [width, height], "grid": [cols, rows], "tiles": cols * rows,
                          "views": layout.views, "tokens": layout.tokens}))


if __name__ == "__main__":
    main()
