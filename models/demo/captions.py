"""Caption grammar, tokenizer and the tiny caption encoder of the demo world.

Grammar (every caption of the demo world has exactly this form; words are lower case)::

    a <colour> <shape> <motion> <speed> on a <background> background

    colour      red | green | blue | yellow | magenta | cyan
    shape       circle | square | triangle
    motion      moving left | moving right | moving up | moving down
                | growing | shrinking | turning <colour>
    speed       slowly | quickly
    background  black | white | gray

e.g. "a red circle moving right quickly on a black background". The empty caption "" is also valid
(the unconditional / negative prompt).

The encoder turns a caption into a [1, L, TEXT_DIM] embedding (L = number of tokens incl. a leading
BOS token), the analogue of umT5's per-token output that the Wan DiT's `text_embedding` consumes; the
demo DiT is built with `text_dim = TEXT_DIM`.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
MOTIONS = ("moving", "growing", "shrinking", "turning")
SPEEDS = ("slowly", "quickly")
BACKGROUNDS = ("black", "white", "gray")

TEXT_DIM = 64
MAX_TOKENS = 16

_SPECIAL = ("<pad>", "<bos>", "<unk>")
VOCAB = _SPECIAL + tuple(dict.fromkeys(
    ("a", "on", "background") + COLOURS + SHAPES + MOTIONS + DIRECTIONS + SPEEDS + BACKGROUNDS))
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
PAD, BOS, UNK = 0, 1, 2

GRAMMAR_HELP = (
    "a <colour> <shape> <motion> <speed> on a <background> background, with colour in "
    f"{'/'.join(COLOURS)}, shape in {'/'.join(SHAPES)}, motion in moving left/right/up/down, growing, "
    f"shrinking or turning <colour>, speed in {'/'.join(SPEEDS)}, background in {'/'.join(BACKGROUNDS)} "
    "(e.g. 'a red circle moving right quickly on a black background'), or an empty caption"
)


@dataclass(frozen=True)
class Caption:
    colour: str
    shape: str
    motion: str            # moving | growing | shrinking | turning
    speed: str
    background: str
    direction: str = ""    # for motion == "moving"
    colour2: str = ""      # for motion == "turning"

    def text(self):
        if self.motion == "moving":
            motion = f"moving {self.direction}"
        elif self.motion == "turning":
            motion = f"turning {self.colour2}"
        else:
            motion = self.motion
        return f"a {self.colour} {self.shape} {motion} {self.speed} on a {self.background} background"


def words(text):
    return re.findall(r"[a-z]+", text.lower())


def parse(text):
    """Caption text -> Caption; None for the empty caption; ValueError naming the grammar otherwise."""
    w = words(text)
    if not w:
        return None

    def fail(why):
        raise ValueError(f"caption {text!r} is not in the demo grammar ({why}); expected {GRAMMAR_HELP}")

    if len(w) not in (9, 10):
        fail(f"{len(w)} words")
    if w[0] != "a":
        fail("it must start with 'a'")
    colour, shape, motion = w[1], w[2], w[3]
    if colour not in COLOURS:
        fail(f"unknown colour {colour!r}")
    if shape not in SHAPES:
        fail(f"unknown shape {shape!r}")
    if motion not in MOTIONS:
        fail(f"unknown motion {motion!r}")
    rest = w[4:]
    direction = colour2 = ""
    if motion in ("moving", "turning"):
        if len(w) != 10:
            fail(f"'{motion}' needs a {'direction' if motion == 'moving' else 'colour'} after it")
        arg, rest = rest[0], rest[1:]
        if motion == "moving":
            if arg not in DIRECTIONS:
                fail(f"unknown direction {arg!r}")
            direction = arg
        else:
            if arg not in COLOURS or arg == colour:
                fail(f"'turning' needs a colour other than {colour!r}, found {arg!r}")
            colour2 = arg
    elif len(w) != 9:
        fail("too many words")
    speed, on, a, bg, bgword = rest
    if speed not in SPEEDS:
        fail(f"unknown speed {speed!r}")
    if (on, a, bgword) != ("on", "a", "background"):
        fail("it must end with 'on a <background> background'")
    if bg not in BACKGROUNDS:
        fail(f"unknown background {bg!r}")
    return Caption(colour, shape, motion, speed, bg, direction, colour2)


def random_caption(gen, motions=MOTIONS, moving_share=0.7):
    """A random Caption drawn with a torch.Generator. `moving_share` of captions are 'moving <dir>'."""

    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=gen))]

    colour, shape, speed, bg = pick(COLOURS), pick(SHAPES), pick(SPEEDS), pick(BACKGROUNDS)
    others = tuple(m for m in motions if m != "moving")
    if "moving" in motions and (not others or float(torch.rand((), generator=gen)) < moving_share):
        motion = "moving"
    else:
        motion = pick(others)
    direction = pick(DIRECTIONS) if motion == "moving" else ""
    colour2 = pick(tuple(c for c in COLOURS if c != colour)) if motion == "turning" else ""
    return Caption(colour, shape, motion, speed, bg, direction, colour2)


def tokenize(text):
    """Caption text -> LongTensor [L] of token ids: BOS then one id per word (unknown words -> UNK)."""
    ids = [BOS] + [WORD_ID.get(x, UNK) for x in words(text)]
    if len(ids) > MAX_TOKENS:
        raise ValueError(f"caption {text!r} has {len(ids) - 1} words; the demo encoder takes at most "
                         f"{MAX_TOKENS - 1}")
    return torch.tensor(ids, dtype=torch.long)


def batch_tokens(texts):
    """List of captions -> (ids [B, MAX_TOKENS] padded with PAD, lengths [B])."""
    toks = [tokenize(t) for t in texts]
    ids = torch.full((len(toks), MAX_TOKENS), PAD, dtype=torch.long)
    for i, t in enumerate(toks):
        ids[i, : len(t)] = t
    return ids, torch.tensor([len(t) for t in toks])


class _Block(nn.Module):
    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))

    def forward(self, x, keep):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = keep[:, None, None, :]  # attend only to real tokens
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.ffn(self.norm2(x))


class CaptionEncoder(nn.Module):
    """Word embedding + learned positions + 2 pre-norm transformer blocks -> [B, L, dim]."""

    def __init__(self, dim=TEXT_DIM, layers=2, heads=4, ffn=128):
        super().__init__()
        self.config = {"dim": dim, "layers": layers, "heads": heads, "ffn": ffn, "vocab": len(VOCAB),
                       "max_tokens": MAX_TOKENS}
        self.dim = dim
        self.embed = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Parameter(torch.zeros(MAX_TOKENS, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids, lengths):
        """ids [B, MAX_TOKENS], lengths [B] -> [B, MAX_TOKENS, dim], rows past each length exactly zero
        (as the Wan DiT pads its context with zero rows)."""
        keep = torch.arange(ids.shape[1], device=ids.device)[None] < lengths.to(ids.device)[:, None]
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x, keep)
        return self.norm(x) * keep[..., None].to(x.dtype)

    @torch.no_grad()
    def encode(self, text):
        """One caption -> [1, L, dim] (L = its token count, no padding rows)."""
        param = next(self.parameters())
        ids, lengths = batch_tokens([text])
        out = self(ids.to(param.device), lengths)
        return out[:, : int(lengths[0])]
