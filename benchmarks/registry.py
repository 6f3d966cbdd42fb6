"""Shapes come from a model registry (hidden size D and vocabulary V of real models' lm_head), times token counts.

A benchmark case is one (operation, shape, dtype, device); `--shape N,D,V` adds a custom shape.
"""
from __future__ import annotations

from dataclasses import dataclass

# name -> (D, V): the last hidden size and vocabulary of the model's lm_head.
MODELS: dict[str, tuple[int, int]] = {
    "llama3-8b": (4096, 128256),
    "qwen2.5-7b": (3584, 152064),
    "gemma2-2b": (2304, 256000),
    "smollm2-135m": (576, 49152),
}

# Final-logit softcap of the models that have one (config.final_logit_softcapping): their benchmark cases run with it
# on every provider that supports it, and the others report the case as unsupported.
SOFTCAP: dict[str, float] = {"gemma2-2b": 30.0}

# The tables the issues ask for. Each entry: (model or None for a custom shape, N, D, V).
CPU_TABLE = [("custom", 4096, 512, 32768), ("smollm2-135m", 2048, *MODELS["smollm2-135m"])]
GPU_TABLE = [
    ("llama3-8b", 4096, *MODELS["llama3-8b"]),
    ("llama3-8b", 8192, *MODELS["llama3-8b"]),
    ("llama3-8b", 16384, *MODELS["llama3-8b"]),
    ("gemma2-2b", 8192, *MODELS["gemma2-2b"]),
]


@dataclass(frozen=True)
class Shape:
    model: str  # a registry name, or "custom"
    N: int  # tokens (batch x sequence, flattened)
    D: int
    V: int

    @property
    def softcap(self) -> float | None:
        return SOFTCAP.get(self.model)

    @property
    def label(self) -> str:
        return f"{self.model} N={self.N}" if self.model != "custom" else f"N={self.N} D={self.D} V={self.V}"


def parse_shape(text: str) -> Shape:
    """'N,D,V' -> Shape('custom', N, D, V)."""
    try:
        N, D, V = (int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"--shape wants N,D,V (three integers), got {text!r}") from None
    if min(N, D, V) <= 0:
        raise ValueError(f"--shape values must be positive, got {text!r}")
    return Shape("custom", N, D, V)


def model_shapes(models: list[str], tokens: list[int]) -> list[Shape]:
    out = []
    for m in models:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; known: {', '.join(MODELS)}")
        D, V = MODELS[m]
        out.extend(Shape(m, n, D, V) for n in tokens)
    return out


def table_shapes(table) -> list[Shape]:
    return [Shape(*row) for row in table]
