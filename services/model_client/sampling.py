"""How the device picks the next token, and where generation stops.

    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, stop=("\\n",), seed=1)
    token = select_token(logits, params, params.generator())        # logits: (vocab,)

`temperature == 0` is greedy (argmax; ties go to the lowest id). Otherwise the logits are divided
by the temperature, cut to the `top_k` most likely tokens (0: no cut), then to the smallest set
whose probability reaches `top_p` (nucleus; 1.0: no cut), and one token is drawn with a seeded
`torch.Generator` (seed None: a fresh random seed), so a seeded request is reproducible.

Stop strings are matched on the decoded text, not on token ids: a stop string may span several
tokens, and a token may hold a stop string plus more text. `StopMatcher` holds back the text that
could still be the start of a stop string, so nothing after (or of) a stop is ever emitted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 128


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16              # new tokens at most (the model's context may cut it shorter)
    temperature: float = 0.0          # 0: greedy
    top_k: int = 0                    # 0: every token
    top_p: float = 1.0                # 1.0: no nucleus cut
    stop: tuple[str, ...] = ()        # generation ends before the first of these in the text
    seed: int | None = 0              # None: not reproducible

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a lone string is one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("top_k", self.top_k, 0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
            if self.seed >= 2 ** 64:   # torch.Generator.manual_seed takes 64 bits
                raise ValueError(f"seed must be below 2**64, got {self.seed!r}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), "
                             f"got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop strings must be non-empty strings of at most "
                                 f"{MAX_STOP_CHARS} characters, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def select_token(logits: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator | None = None) -> int:
    """The next token id from one position's logits (vocab,)."""
    if logits.dim() != 1:
        raise ValueError(f"select_token takes (vocab,) logits, got {tuple(logits.shape)}")
    if params.greedy:
        return int(logits.argmax())
    # shift so the largest logit is 0 first: a tiny temperature then gives -inf, never nan
    scaled = (logits.float() - logits.max()) / params.temperature
    if params.top_k and params.top_k < scaled.numel():
        # keep exactly k ids (topk, not a threshold: ties at the k-th value would let more in)
        keep = scaled.topk(params.top_k).indices
        scaled = torch.full_like(scaled, float("-inf")).scatter(0, keep, scaled[keep])
    if params.top_p < 1.0:
        # stable sort: among equal logits the lowest id comes first, as in argmax
        values, order = scaled.sort(descending=True, stable=True)
        probs = values.softmax(-1)
        # drop a token when the ones before it already reach top_p; the first always stays
        drop = probs.cumsum(-1) - probs >= params.top_p
        drop[0] = False
        scaled = scaled.scatter(0, order[drop], float("-inf"))
    return int(torch.multinomial(scaled.softmax(-1), 1, generator=generator))


class StopMatcher:
    """Cuts a stream of text pieces at the first stop string, across piece boundaries.

        m = StopMatcher(("###",))
        m.feed("ab#")   -> "ab"        ("#" held back: it may start "###")
        m.feed("##cd")  -> ""          and m.stopped is True
        m.flush()       -> ""          (the text held back, when no stop came)
    """

    def __init__(self, stop: tuple[str, ...] = ()):
        self.stop = tuple(stop)
        self.held = ""          # text that may be the beginning of a stop string
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The part of `piece` (plus what was held) that can be emitted now."""
        if self.stopped:
            return ""
        if not self.stop:
            return piece
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        keep = self._partial_suffix(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """What was held back, at the end of generation (it never became a stop string)."""
        out, self.held = self.held, ""
        return out

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
