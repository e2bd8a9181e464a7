"""The peak learning rate from a scaling law, and the weight-decay rule that goes with it.

``optim.lr`` takes one of:

- a number: the peak learning rate, used as given;
- ``law``: MM1's published law (McKinzie et al., arXiv 2403.09611, sec. 3.5),
  ``ln(eta) = -0.4214 ln(N) - 0.5535``;
- ``law:/path/lr_law.json``: a law fitted by ``ablate-lr fit`` (its ``a`` and ``b``).

``N`` is the decoder's non-embedding parameter count
(``Transformer.num_params(non_embedding=True)``: token embedding and output head left
out; for an MoE decoder every expert counts), the same number ``results.json`` records
as ``params.decoder_non_embedding`` and ``ablate-lr fit`` fits on.

Weight decay (``optim.weight_decay``) is in torch's AdamW convention, where the decay
is multiplied by the scheduled learning rate ``lr_t = s_t * eta`` (``s_t`` the
warmup/cosine multiplier)::

    torch AdamW:      p <- p - lr_t * wd * p     - lr_t * adam_step
    decoupled (MM1):  p <- p - s_t * lambda * p  - lr_t * adam_step

MM1 sets ``lambda = 0.1 * eta``; equal decay needs ``lr_t * wd = s_t * lambda``, so
``wd = lambda / eta = 0.1``. The rule is therefore: ``optim.weight_decay = 0.1`` *is*
MM1's decay at whatever ``eta`` the law gives, and nothing is rescaled when the lr comes
from the law. The equality is exact at every step when the decoupled decay follows the
schedule (Loshchilov & Hutter's AdamW multiplies both terms by ``s_t``) and at the peak
in any case. A decay quoted in the decoupled convention can be given as
``optim.decoupled_weight_decay=lambda``; it becomes ``weight_decay = lambda / eta``
(``tests/test_lr_law.py`` checks both against a one-step hand computation).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

LAW_PREFIX = "law"


@dataclass(frozen=True)
class LrLaw:
    """``ln(lr) = a ln(N) + b``."""

    a: float
    b: float
    source: str

    def lr(self, n: float) -> float:
        return math.exp(self.a * math.log(n) + self.b)

    def describe(self) -> str:
        return f"ln(lr) = {self.a:.4f} ln(N) {'-' if self.b < 0 else '+'} {abs(self.b):.4f} ({self.source})"


MM1_LAW = LrLaw(a=-0.4214, b=-0.5535, source="MM1, arXiv 2403.09611")


def load_law(path: str | Path) -> LrLaw:
    """The law in an ``ablate-lr fit`` output (``lr_law.json``: numbers ``a`` and ``b``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    try:
        data = json.loads(p.read_text())
        a, b = float(data["a"]), float(data["b"])
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{p}: not an lr law file (needs numbers 'a' and 'b'; "
                         f"write one with `ablate-lr fit`): {type(e).__name__}: {e}") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"{p}: a={a}, b={b} are not finite")
    return LrLaw(a=a, b=b, source=str(p))


def parse_lr(value) -> float | LrLaw:
    """A number, or the law ``optim.lr`` names; ``ValueError`` (message without the key)
    for anything else."""
    if isinstance(value, bool):
        raise ValueError("expected a number, 'law' or 'law:/path/lr_law.json'")
    if isinstance(value, (int, float)):
        lr = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text == LAW_PREFIX:
            return MM1_LAW
        if text.startswith(LAW_PREFIX + ":"):
            path = text[len(LAW_PREFIX) + 1:]
            if not path:
                raise ValueError("'law:' needs a file: law:/path/lr_law.json")
            return load_law(path)
        try:
            lr = float(text)
        except ValueError:
            raise ValueError("expected a number, 'law' (MM1's published law) or "
                             "'law:/path/lr_law.json' (a law from `ablate-lr fit`)") from None
    else:
        raise ValueError(f"expected a number or 'law[:file]', got {type(value).__name__}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError("must be > 0")
    return lr


@dataclass(frozen=True)
class OptimSettings:
    """What the optimizer is built with, and where the numbers came from."""

    lr: float
    """Peak learning rate."""
    weight_decay: float
    """Decay in torch's AdamW convention (multiplied by the scheduled lr)."""
    n_params: int | None
    """N the law was evaluated at (decoder non-embedding parameters)."""
    law: LrLaw | None
    """The law the lr came from; None for a number given in the config."""

    @property
    def decoupled_weight_decay(self) -> float:
        """The same decay per step at the peak, in the decoupled convention (MM1's lambda)."""
        return self.weight_decay * self.lr

    def record(self) -> dict:
        """Logged (wandb, metrics.jsonl) and written to ``results.json`` as ``optim``."""
        out = {"optim/lr": self.lr, "optim/weight_decay": self.weight_decay,
               "optim/decoupled_weight_decay": self.decoupled_weight_decay}
        if self.n_params is not None:
            out["optim/N"] = self.n_params
        if self.law is not None:
            out["optim/lr_from_law"] = self.lr
        return out

    def describe(self) -> str:
        src = (f"from {self.law.describe()} at N={self.n_params:,}" if self.law else "as configured")
        return (f"lr {self.lr:.4g} {src}; weight decay {self.weight_decay:.4g} in torch's AdamW "
                f"convention (= decoupled {self.decoupled_weight_decay:.3g} per step at the peak)")


def torch_weight_decay(weight_decay: float, decoupled: float | None, lr: float) -> float:
    """``optim.weight_decay`` unless a decoupled value is given; then ``decoupled / lr``."""
    return float(weight_decay) if decoupled is None else float(decoupled) / lr


def resolve(optim, n_params: int) -> OptimSettings:
    """The numbers the optimizer gets, from the ``optim`` config section and the model's N."""
    spec = parse_lr(optim.lr)
    law = spec if isinstance(spec, LrLaw) else None
    lr = law.lr(n_params) if law else spec
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"optim.lr={optim.lr}: the law gives lr={lr} at N={n_params}")
    wd = torch_weight_decay(optim.weight_decay, optim.get("decoupled_weight_decay"), lr)
    return OptimSettings(lr=lr, weight_decay=wd, n_params=n_params, law=law)


def optim_problems(optim, n_params: int | None) -> list[str]:
    """Every problem of ``optim.lr`` / the weight decay, named by key (for ``ablate.validate``)."""
    problems = []
    try:
        spec = parse_lr(optim.lr)
    except (ValueError, FileNotFoundError) as e:
        problems.append(f"optim.lr={optim.lr!r}: {e}")
        spec = None
    if isinstance(spec, LrLaw) and n_params is not None:
        if n_params < 1:
            problems.append(f"optim.lr={optim.lr!r}: the decoder has N={n_params} non-embedding "
                            "parameters; the law needs N >= 1")
        else:
            lr = spec.lr(n_params)
            if not (math.isfinite(lr) and 0 < lr < 10):
                problems.append(f"optim.lr={optim.lr!r}: the law gives lr={lr:.3g} at N={n_params:,}")
    if optim.weight_decay < 0:
        problems.append(f"optim.weight_decay={optim.weight_decay}: must be >= 0")
    decoupled = optim.get("decoupled_weight_decay")
    if decoupled is not None and decoupled < 0:
        problems.append(f"optim.decoupled_weight_decay={decoupled}: must be >= 0")
    return problems
